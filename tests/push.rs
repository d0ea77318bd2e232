//! Push rules that run: unread counts in `/sync` moved by messages, mentions and receipts;
//! `GET /notifications`; pushers delivering to a small HTTP gateway (down, then up; rejecting
//! a pushkey); and counting that survives a kill -9.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{enc, TestServer};
use serde_json::{json, Value};

/// Polls `f` every 50 ms until it returns `Some`, for at most 20 s.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Alice's room with Bob joined; returns (room, alice token, bob id, bob token).
fn two_users(s: &TestServer) -> (String, String, String, String) {
    let (_, alice) = s.register("alice");
    let (bob_id, bob) = s.register("bob");
    let room = s.create_room(&alice, json!({ "invite": [bob_id] }));
    join(s, &bob, &room);
    (room, alice, bob_id, bob)
}

fn join(s: &TestServer, token: &str, room: &str) {
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/join/{}", enc(room)),
        Some(token),
        Some(&json!({})),
    );
}

fn send_content(s: &TestServer, token: &str, room: &str, content: Value) -> String {
    let txn = format!("t{}", rand_id());
    s.ok(
        "PUT",
        &format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            enc(room)
        ),
        Some(token),
        Some(&content),
    )["event_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

/// (notification_count, highlight_count) of a room in an initial sync.
fn counts(s: &TestServer, token: &str, room: &str) -> (u64, u64) {
    let v = s.sync(token, "timeout=0");
    let u = &v["rooms"]["join"][room]["unread_notifications"];
    (
        u["notification_count"].as_u64().unwrap_or(u64::MAX),
        u["highlight_count"].as_u64().unwrap_or(u64::MAX),
    )
}

fn wait_counts(s: &TestServer, token: &str, room: &str, want: (u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let last = counts(s, token, room);
        if last == want {
            break;
        }
        assert!(Instant::now() < deadline, "counts {last:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // And they stay there (nothing is counted twice later).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counts(s, token, room), want);
}

fn receipt(s: &TestServer, token: &str, room: &str, kind: &str, event: &str) {
    s.ok(
        "POST",
        &format!(
            "/_matrix/client/v3/rooms/{}/receipt/{kind}/{}",
            enc(room),
            enc(event)
        ),
        Some(token),
        Some(&json!({})),
    );
}

#[test]
fn counts_move_with_messages_mentions_and_receipts() {
    let s = TestServer::start();
    let (room, alice, bob_id, bob) = two_users(&s);
    // (A profile change is a member event: without a receipt, counting starts after it.)
    s.ok(
        "PUT",
        &format!("/_matrix/client/v3/profile/{}/displayname", enc(&bob_id)),
        Some(&bob),
        Some(&json!({ "displayname": "Bobby" })),
    );
    wait_counts(&s, &bob, &room, (0, 0));

    send_content(&s, &alice, &room, text("hello"));
    wait_counts(&s, &bob, &room, (1, 0));
    // Bob's own message counts for nobody (Alice's counts move, not Bob's).
    send_content(&s, &bob, &room, text("hi there"));
    wait_counts(&s, &bob, &room, (1, 0));
    wait_counts(&s, &alice, &room, (1, 0));

    // Mentions: m.mentions and @room highlight, and so does the display name in the body of
    // an event without m.mentions (the legacy rule Synapse keeps), but not with m.mentions.
    send_content(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "Bobby?", "m.mentions": {} }),
    );
    wait_counts(&s, &bob, &room, (2, 0));
    send_content(&s, &alice, &room, text("what do you think, Bobby?"));
    wait_counts(&s, &bob, &room, (3, 1));
    send_content(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "ping", "m.mentions": { "user_ids": [bob_id] } }),
    );
    wait_counts(&s, &bob, &room, (4, 2));
    let last = send_content(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "@room lunch", "m.mentions": { "room": true } }),
    );
    wait_counts(&s, &bob, &room, (5, 3));

    // A private read receipt on the last event resets both counts.
    receipt(&s, &bob, &room, "m.read.private", &last);
    wait_counts(&s, &bob, &room, (0, 0));
    send_content(&s, &alice, &room, text("one more"));
    wait_counts(&s, &bob, &room, (1, 0));

    // A public receipt on an older event does not move the counts back.
    receipt(&s, &bob, &room, "m.read", &last);
    wait_counts(&s, &bob, &room, (1, 0));

    // Threads: counted in the main numbers, or apart when the filter asks.
    let root = send_content(&s, &alice, &room, text("thread root"));
    send_content(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "in thread",
                "m.relates_to": { "rel_type": "m.thread", "event_id": root } }),
    );
    wait_counts(&s, &bob, &room, (3, 0));
    let filter = enc(
        &json!({ "room": { "timeline": { "unread_thread_notifications": true } } }).to_string(),
    );
    let v = s.sync(&bob, &format!("timeout=0&filter={filter}"));
    let r = &v["rooms"]["join"][room.as_str()];
    assert_eq!(r["unread_notifications"]["notification_count"], 2, "{r}");
    assert_eq!(
        r["unread_thread_notifications"][root.as_str()]["notification_count"],
        1,
        "{r}"
    );
}

#[test]
fn incremental_sync_wakes_with_new_counts() {
    let s = TestServer::start();
    let (room, alice, _, bob) = two_users(&s);
    let mut since = s.sync(&bob, "timeout=0")["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    send_content(&s, &alice, &room, text("hello"));
    // The long-poll may first wake for the event (counts not yet evaluated), then again for
    // the evaluator's write: within a few polls the counts arrive.
    let got = eventually("count 1 over incremental sync", || {
        let v = s.sync(&bob, &format!("since={since}&timeout=5000"));
        since = v["next_batch"].as_str().unwrap().to_owned();
        let n = v["rooms"]["join"][room.as_str()]["unread_notifications"]["notification_count"]
            .as_u64();
        (n == Some(1)).then_some(n)
    });
    assert_eq!(got, Some(1));
}

#[test]
fn notifications_list_highlights_and_pages() {
    let s = TestServer::start();
    let (room, alice, bob_id, bob) = two_users(&s);
    let mut ids = Vec::new();
    for i in 0..5 {
        let content = if i % 2 == 0 {
            json!({ "msgtype": "m.text", "body": format!("hey {i}"), "m.mentions": { "user_ids": [bob_id] } })
        } else {
            text(&format!("plain {i}"))
        };
        ids.push(send_content(&s, &alice, &room, content));
    }
    wait_counts(&s, &bob, &room, (5, 3));
    let all = s.ok("GET", "/_matrix/client/v3/notifications", Some(&bob), None);
    let got: Vec<&str> = all["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["event"]["event_id"].as_str().unwrap())
        .collect();
    // The messages, newest first, then Bob's invite (`.m.rule.invite_for_me`).
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(got[..5], newest_first[..]);
    assert_eq!(got.len(), 6);
    assert_eq!(all["notifications"][5]["event"]["type"], "m.room.member");
    let n0 = &all["notifications"][0];
    assert_eq!(n0["room_id"], room.as_str());
    assert_eq!(n0["read"], false);
    assert!(n0["actions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "notify"));

    let hl = s.ok(
        "GET",
        "/_matrix/client/v3/notifications?only=highlight",
        Some(&bob),
        None,
    );
    let hl_ids: Vec<&str> = hl["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["event"]["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        hl_ids,
        vec![ids[4].as_str(), ids[2].as_str(), ids[0].as_str()]
    );

    // Pages of two: 2 + 2 + 2, no token after the last (a full page may get an empty next).
    let mut paged = Vec::new();
    let mut from = String::new();
    for _ in 0..5 {
        let q = if from.is_empty() {
            "limit=2".to_owned()
        } else {
            format!("limit=2&from={from}")
        };
        let p = s.ok(
            "GET",
            &format!("/_matrix/client/v3/notifications?{q}"),
            Some(&bob),
            None,
        );
        for n in p["notifications"].as_array().unwrap() {
            paged.push(n["event"]["event_id"].as_str().unwrap().to_owned());
        }
        match p["next_token"].as_str() {
            Some(t) => from = t.to_owned(),
            None => break,
        }
    }
    assert_eq!(paged[..5], newest_first[..]);
    assert_eq!(paged.len(), 6);

    // A receipt marks the older ones read.
    receipt(&s, &bob, &room, "m.read", &ids[2]);
    let after = s.ok("GET", "/_matrix/client/v3/notifications", Some(&bob), None);
    let read: Vec<bool> = after["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["read"].as_bool().unwrap())
        .collect();
    assert_eq!(read, vec![false, false, true, true, true, true]);
    s.err(
        "GET",
        "/_matrix/client/v3/notifications?from=nope",
        Some(&bob),
        None,
        400,
        "M_INVALID_PARAM",
    );
}

// ---------------------------------------------------------------- pushers and a gateway

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Up,
    Down,
    Reject,
}

/// A push gateway on loopback that records every notify body it gets and answers by `mode`.
struct Gateway {
    port: u16,
    mode: Arc<Mutex<Mode>>,
    /// (the body, whether it was answered 200 without rejecting).
    got: Arc<Mutex<Vec<(Value, bool)>>>,
}

impl Gateway {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(Mutex::new(Mode::Up));
        let got = Arc::new(Mutex::new(Vec::new()));
        let (m, g) = (mode.clone(), got.clone());
        // Ends with the test process (a blocking accept loop on loopback).
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut len = 0;
                let mut line = String::new();
                loop {
                    line.clear();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let l = line.trim_end();
                    if l.is_empty() {
                        break;
                    }
                    if let Some((k, v)) = l.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                }
                let mut body = vec![0; len];
                if reader.read_exact(&mut body).is_err() {
                    continue;
                }
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let mode = *m.lock().unwrap();
                let pushkey = v["notification"]["devices"][0]["pushkey"].clone();
                let (status, answer) = match mode {
                    Mode::Up => ("200 OK", json!({ "rejected": [] })),
                    Mode::Down => ("503 Service Unavailable", json!({})),
                    Mode::Reject => ("200 OK", json!({ "rejected": [pushkey] })),
                };
                g.lock().unwrap().push((v, mode == Mode::Up));
                let answer = answer.to_string();
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
            }
        });
        Self { port, mode, got }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/_matrix/push/v1/notify", self.port)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Event IDs the gateway took (answered 200, not rejected), in order.
    fn delivered(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(v, _)| {
                v["notification"]["event_id"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned()
            })
            .collect()
    }

    fn received(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    fn last(&self) -> Value {
        self.got.lock().unwrap().last().unwrap().0.clone()
    }
}

fn set_pusher(s: &TestServer, token: &str, url: &str, pushkey: &str, extra: Value) -> (u16, Value) {
    let mut body = json!({
        "kind": "http",
        "app_id": "org.example.app",
        "pushkey": pushkey,
        "app_display_name": "Example",
        "device_display_name": "Phone",
        "lang": "en",
        "data": { "url": url, "format": "event_id_only" },
    });
    if let (Some(b), Value::Object(e)) = (body.as_object_mut(), extra) {
        b.extend(e);
    }
    s.req(
        "POST",
        "/_matrix/client/v3/pushers/set",
        Some(token),
        Some(&body),
    )
}

fn pushers(s: &TestServer, token: &str) -> Vec<Value> {
    s.ok("GET", "/_matrix/client/v3/pushers", Some(token), None)["pushers"]
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn pushers_are_validated_listed_and_deleted() {
    let s = TestServer::start();
    let (_, bob) = s.register("bob");
    let (_, carol) = s.register("carol");
    for bad in [
        "ftp://example.org/_matrix/push/v1/notify",
        "http://example.org/notify",
        "not a url",
    ] {
        let (st, v) = set_pusher(&s, &bob, bad, "k1", json!({}));
        assert_eq!(
            (st, v["errcode"].as_str()),
            (400, Some("M_INVALID_PARAM")),
            "{bad}"
        );
    }
    let (st, _) = set_pusher(
        &s,
        &bob,
        "https://push.example.org/_matrix/push/v1/notify",
        "k1",
        json!({}),
    );
    assert_eq!(st, 200);
    let list = pushers(&s, &bob);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["pushkey"], "k1");
    assert_eq!(list[0]["kind"], "http");
    assert_eq!(list[0]["data"]["format"], "event_id_only");
    assert_eq!(list[0]["app_display_name"], "Example");
    // The same pushkey for another user: without append it moves; with append both keep it.
    set_pusher(
        &s,
        &carol,
        "https://push.example.org/_matrix/push/v1/notify",
        "k1",
        json!({}),
    );
    assert!(pushers(&s, &bob).is_empty());
    assert_eq!(pushers(&s, &carol).len(), 1);
    set_pusher(
        &s,
        &bob,
        "https://push.example.org/_matrix/push/v1/notify",
        "k1",
        json!({ "append": true }),
    );
    assert_eq!((pushers(&s, &bob).len(), pushers(&s, &carol).len()), (1, 1));
    // Deleted by `kind: null`.
    let (st, _) = s.req(
        "POST",
        "/_matrix/client/v3/pushers/set",
        Some(&bob),
        Some(&json!({ "kind": null, "app_id": "org.example.app", "pushkey": "k1" })),
    );
    assert_eq!(st, 200);
    assert!(pushers(&s, &bob).is_empty());
    assert_eq!(pushers(&s, &carol).len(), 1);
}

#[test]
fn gateway_gets_one_notify_per_notifying_event_with_retries_and_rejection() {
    let gw = Gateway::start();
    let s = TestServer::start();
    let (room, alice, bob_id, bob) = two_users(&s);
    // A second room: the badge counts rooms with unread notifications.
    let room2 = s.create_room(&alice, json!({ "invite": [bob_id] }));
    join(&s, &bob, &room2);
    // Both invites evaluated (before the pusher exists, so they are not pushed).
    eventually("invites evaluated", || {
        let n = s.ok("GET", "/_matrix/client/v3/notifications", Some(&bob), None);
        (n["notifications"].as_array().unwrap().len() == 2).then_some(())
    });
    let (st, v) = set_pusher(&s, &bob, &gw.url(), "bobs-phone", json!({}));
    assert_eq!(st, 200, "{v}");

    // A message: one notify, event ID only, the badge from the same numbers as /sync.
    let e1 = send_content(&s, &alice, &room, text("hello"));
    eventually("first notify", || {
        (gw.delivered() == vec![e1.clone()]).then_some(())
    });
    let n = gw.last()["notification"].clone();
    assert_eq!(n["room_id"], room.as_str());
    assert_eq!(n["counts"]["unread"], 1);
    assert_eq!(n["prio"], "high", "a one-to-one room's message sounds: {n}");
    assert!(n.get("content").is_none(), "event_id_only: {n}");
    let dev = &n["devices"][0];
    assert_eq!(dev["app_id"], "org.example.app");
    assert_eq!(dev["pushkey"], "bobs-phone");
    assert_eq!(dev["data"]["format"], "event_id_only");
    assert!(dev["data"].get("url").is_none());
    assert!(dev["pushkey_ts"].as_i64().unwrap() > 1_600_000_000);

    // Bob's own message notifies nobody with a pusher.
    send_content(&s, &bob, &room, text("hi"));

    // The gateway is down: the notify is retried until it is up again, and sent once.
    gw.set(Mode::Down);
    let e2 = send_content(&s, &alice, &room2, text("are you there"));
    eventually("a failed attempt", || (gw.received() >= 2).then_some(()));
    gw.set(Mode::Up);
    eventually("the retry", || (gw.delivered().len() == 2).then_some(()));
    assert_eq!(gw.delivered(), vec![e1.clone(), e2.clone()]);
    assert_eq!(gw.last()["notification"]["counts"]["unread"], 2);

    // The gateway rejects the pushkey: the pusher goes, nothing more is sent.
    gw.set(Mode::Reject);
    send_content(&s, &alice, &room, text("third"));
    eventually("pusher removed", || {
        pushers(&s, &bob).is_empty().then_some(())
    });
    let seen = gw.received();
    gw.set(Mode::Up);
    send_content(&s, &alice, &room, text("fourth"));
    wait_counts(&s, &bob, &room, (3, 0));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(gw.received(), seen, "no notify after the rejection");
    assert_eq!(gw.delivered(), vec![e1, e2], "each event delivered once");
}

/// Full format: the event's type, sender and content ride along, with the rule's tweaks.
#[test]
fn full_format_carries_the_event_and_tweaks() {
    let gw = Gateway::start();
    let s = TestServer::start();
    let (room, alice, bob_id, bob) = two_users(&s);
    let body = json!({
        "kind": "http", "app_id": "a", "pushkey": "k", "app_display_name": "A",
        "device_display_name": "D", "lang": "en", "data": { "url": gw.url() },
    });
    s.ok(
        "POST",
        "/_matrix/client/v3/pushers/set",
        Some(&bob),
        Some(&body),
    );
    send_content(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "hey", "m.mentions": { "user_ids": [bob_id] } }),
    );
    eventually("notify", || (gw.delivered().len() == 1).then_some(()));
    let n = gw.last()["notification"].clone();
    assert_eq!(n["type"], "m.room.message");
    assert_eq!(n["content"]["body"], "hey");
    assert_eq!(n["devices"][0]["tweaks"]["highlight"], true, "{n}");
}

#[test]
fn evaluation_survives_a_restart_without_double_counting() {
    let s = TestServer::start();
    let (room, alice, _, bob) = two_users(&s);
    for i in 0..20 {
        send_content(&s, &alice, &room, text(&format!("m{i}")));
    }
    let mut s = s;
    // Stop while the evaluator may still be working, then start on the same database.
    let cfg_dir = s.dir.path().to_owned();
    s.hs.take().unwrap().stop().unwrap();
    let hs = hearth::Homeserver::start(common::config_in(&cfg_dir)).unwrap();
    s.base = format!("http://{}", hs.addrs()[0]);
    s.hs = Some(hs);
    wait_counts(&s, &bob, &room, (20, 0));
    let n = s.ok(
        "GET",
        "/_matrix/client/v3/notifications?limit=100",
        Some(&bob),
        None,
    );
    let messages = n["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["event"]["type"] == "m.room.message")
        .count();
    assert_eq!(messages, 20);
}

/// Hearth killed with SIGKILL while messages arrive and the evaluator works: after the
/// restart every stored message is counted exactly once (no notification row twice, none
/// missing), whatever the evaluator had stored at the kill.
#[test]
fn kill9_mid_burst_counts_every_message_once() {
    use common::fed::{curl, register, HearthProcess};
    let mut h = HearthProcess::start();
    let base = h.url();
    let (_, alice) = register(&base, "alice");
    let (bob_id, bob) = register(&base, "bob");
    let (st, v) = curl(
        "POST",
        &format!("{base}/_matrix/client/v3/createRoom"),
        Some(&alice),
        Some(&json!({ "invite": [bob_id] })),
    );
    assert_eq!(st, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let (st, _) = curl(
        "POST",
        &format!("{base}/_matrix/client/v3/join/{}", enc(&room)),
        Some(&bob),
        Some(&json!({})),
    );
    assert_eq!(st, 200);
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let burst = {
        let (base, room, alice, sent) = (base.clone(), room.clone(), alice.clone(), sent.clone());
        std::thread::spawn(move || {
            for i in 0..60 {
                let (st, _) = curl(
                    "PUT",
                    &format!(
                        "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/b{i}",
                        enc(&room)
                    ),
                    Some(&alice),
                    Some(&text(&format!("burst {i}"))),
                );
                if st != 200 {
                    return;
                }
                sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    };
    eventually("a dozen sent", || {
        (sent.load(std::sync::atomic::Ordering::SeqCst) >= 12).then_some(())
    });
    h.kill9();
    burst.join().unwrap();
    {
        let db = rusqlite::Connection::open(h.db_path()).unwrap();
        let (evaluated, newest): (String, i64) = db
            .query_row(
                "SELECT (SELECT value FROM meta WHERE key = 'push_pos'), (SELECT MAX(pos) FROM events)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        eprintln!("at the kill: evaluated up to {evaluated}, newest event {newest}");
    }
    h.restart();
    let (st, v) = curl(
        "GET",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=200",
            enc(&room)
        ),
        Some(&bob),
        None,
    );
    assert_eq!(st, 200, "{v}");
    let stored: Vec<String> = v["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(stored.len() >= 12, "{}", stored.len());
    let listed = eventually("every stored message counted", || {
        let (_, n) = curl(
            "GET",
            &format!("{base}/_matrix/client/v3/notifications?limit=500"),
            Some(&bob),
            None,
        );
        let ids: Vec<String> = n["notifications"]
            .as_array()?
            .iter()
            .filter(|n| n["event"]["type"] == "m.room.message")
            .map(|n| n["event"]["event_id"].as_str().unwrap_or("").to_owned())
            .collect();
        (ids.len() >= stored.len()).then_some(ids)
    });
    let mut unique = listed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), listed.len(), "a notification stored twice");
    assert_eq!(listed, stored, "newest first, each stored message once");
    let (_, v) = curl(
        "GET",
        &format!("{base}/_matrix/client/v3/sync?timeout=0"),
        Some(&bob),
        None,
    );
    let n = &v["rooms"]["join"][room.as_str()]["unread_notifications"]["notification_count"];
    assert_eq!(n.as_u64(), Some(stored.len() as u64));
}
