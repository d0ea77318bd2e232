//! Issue 13's remaining push and presence details: a redaction takes its notification along;
//! pushers go with the device that set them; read notifications are pruned after Synapse's
//! windows; presence is per device; a join brings presence both ways (locally and across
//! servers); a message wakes a parked `/sync` once, with its counts.

mod common;

use std::time::{Duration, Instant};

use common::{enc, ManualClock, TestServer};
use serde_json::{json, Value};

/// Polls `f` every 50 ms until it returns `Some`, for at most 20 s.
fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A public room of alice's with bob joined: (room, alice token, bob id, bob token).
fn room_of_two(s: &TestServer) -> (String, String, String, String) {
    let (_, alice) = s.register("alice");
    let (bob_id, bob) = s.register("bob");
    let room = s.create_room(&alice, json!({ "preset": "public_chat" }));
    s.join(&bob, &room);
    (room, alice, bob_id, bob)
}

fn message(s: &TestServer, token: &str, room: &str, content: Value) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let txn = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = format!(
        "/_matrix/client/v3/rooms/{}/send/m.room.message/m{txn}",
        enc(room)
    );
    s.ok("PUT", &path, Some(token), Some(&content))["event_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The event IDs `GET /notifications` lists for `token`, newest first.
fn notified(s: &TestServer, token: &str) -> Vec<String> {
    s.ok("GET", "/_matrix/client/v3/notifications", Some(token), None)["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["event"]["event_id"].as_str().unwrap().to_owned())
        .collect()
}

/// `unread_notifications` of a room in an initial sync: (notifications, highlights).
fn unread(s: &TestServer, token: &str, room: &str) -> (u64, u64) {
    let v = s.sync(token, "timeout=0");
    let u = &v["rooms"]["join"][room]["unread_notifications"];
    (
        u["notification_count"].as_u64().unwrap_or(u64::MAX),
        u["highlight_count"].as_u64().unwrap_or(u64::MAX),
    )
}

#[test]
fn a_redaction_removes_the_notification_and_the_unread_count() {
    let s = TestServer::start();
    let (room, alice, _, bob) = room_of_two(&s);
    let kept = message(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "stays" }),
    );
    let gone = message(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "oops" }),
    );
    until("both notifications", || {
        (notified(&s, &bob) == [gone.clone(), kept.clone()]).then_some(())
    });
    assert_eq!(unread(&s, &bob, &room), (2, 0));
    let path = format!(
        "/_matrix/client/v3/rooms/{}/redact/{}/r1",
        enc(&room),
        enc(&gone)
    );
    s.ok("PUT", &path, Some(&alice), Some(&json!({})));
    // At once: the redaction's write removed the row (Synapse deletes it as it persists the
    // redaction); the redaction itself notifies nobody.
    assert_eq!(notified(&s, &bob), std::slice::from_ref(&kept));
    assert_eq!(unread(&s, &bob, &room), (1, 0));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(notified(&s, &bob), [kept]);
}

fn login(s: &TestServer, user: &str) -> (String, String) {
    let v = s.ok(
        "POST",
        "/_matrix/client/v3/login",
        None,
        Some(&json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": user },
            "password": format!("pw-{user}"),
        })),
    );
    (
        v["access_token"].as_str().unwrap().to_owned(),
        v["device_id"].as_str().unwrap().to_owned(),
    )
}

fn add_pusher(s: &TestServer, token: &str, pushkey: &str) {
    let body = json!({
        "kind": "http",
        "app_id": "org.example.app",
        "pushkey": pushkey,
        "app_display_name": "Example",
        "device_display_name": pushkey,
        "lang": "en",
        "data": { "url": "http://127.0.0.1:9/_matrix/push/v1/notify" },
    });
    s.ok(
        "POST",
        "/_matrix/client/v3/pushers/set",
        Some(token),
        Some(&body),
    );
}

fn pushkeys(s: &TestServer, token: &str) -> Vec<String> {
    s.ok("GET", "/_matrix/client/v3/pushers", Some(token), None)["pushers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pushkey"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn logging_out_or_deleting_a_device_removes_the_pushers_it_set() {
    let s = TestServer::start();
    let (_, first) = s.register("bob");
    let (second, _) = login(&s, "bob");
    let (third, third_device) = login(&s, "bob");
    add_pusher(&s, &first, "k1");
    add_pusher(&s, &second, "k2");
    add_pusher(&s, &third, "k3");
    assert_eq!(pushkeys(&s, &first), ["k1", "k2", "k3"]);
    s.ok(
        "POST",
        "/_matrix/client/v3/logout",
        Some(&second),
        Some(&json!({})),
    );
    assert_eq!(pushkeys(&s, &first), ["k1", "k3"]);
    s.ok(
        "DELETE",
        &format!("/_matrix/client/v3/devices/{}", enc(&third_device)),
        Some(&first),
        Some(&json!({ "auth": {
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": "bob" },
            "password": "pw-bob",
        } })),
    );
    assert_eq!(pushkeys(&s, &first), ["k1"]);
    // A pusher replaced from another device now belongs to that one.
    let (fourth, _) = login(&s, "bob");
    add_pusher(&s, &fourth, "k1");
    s.ok(
        "POST",
        "/_matrix/client/v3/logout",
        Some(&fourth),
        Some(&json!({})),
    );
    assert!(pushkeys(&s, &first).is_empty());
}

#[test]
fn read_notifications_are_pruned_after_a_day_and_read_highlights_after_thirty() {
    let clock = ManualClock::new(now_ms());
    let s = TestServer::start_with_clock(|c| c.push.prune_every_secs = 1, clock.clone());
    let (room, alice, bob_id, bob) = room_of_two(&s);
    let plain = message(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "one" }),
    );
    let mention = message(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "you", "m.mentions": { "user_ids": [bob_id] } }),
    );
    let path = format!(
        "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
        enc(&room),
        enc(&mention)
    );
    s.ok("POST", &path, Some(&bob), Some(&json!({})));
    let unread_one = message(
        &s,
        &alice,
        &room,
        json!({ "msgtype": "m.text", "body": "new" }),
    );
    let all = [unread_one.clone(), mention.clone(), plain.clone()];
    until("three notifications", || {
        (notified(&s, &bob) == all).then_some(())
    });
    assert_eq!(unread(&s, &bob, &room), (1, 0));
    // Half a day later nothing is old enough.
    clock.advance(12 * 3600 * 1000);
    std::thread::sleep(Duration::from_millis(2_500));
    assert_eq!(notified(&s, &bob), all);
    // Two days: the read plain one goes; the read highlight and the unread one stay.
    clock.advance(36 * 3600 * 1000);
    until("the read notification is pruned", || {
        (notified(&s, &bob) == [unread_one.clone(), mention.clone()]).then_some(())
    });
    assert_eq!(unread(&s, &bob, &room), (1, 0));
    // A month: the read highlight goes too; the unread one stays (it is still counted).
    clock.advance(30 * 24 * 3600 * 1000);
    until("the read highlight is pruned", || {
        (notified(&s, &bob) == [unread_one.clone()]).then_some(())
    });
    assert_eq!(unread(&s, &bob, &room), (1, 0));
}

fn presence_of(s: &TestServer, token: &str, user: &str) -> String {
    let path = format!("/_matrix/client/v3/presence/{}/status", enc(user));
    s.ok("GET", &path, Some(token), None)["presence"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn put_presence(s: &TestServer, token: &str, user: &str, state: &str) {
    let path = format!("/_matrix/client/v3/presence/{}/status", enc(user));
    s.ok(
        "PUT",
        &path,
        Some(token),
        Some(&json!({ "presence": state })),
    );
}

#[test]
fn a_user_is_online_while_any_of_their_devices_is() {
    let clock = ManualClock::new(now_ms());
    let s = TestServer::start_with_clock(|_| {}, clock.clone());
    let (_, alice, bob_id, phone) = room_of_two(&s);
    let (laptop, _) = login(&s, "bob");
    s.sync(&phone, "timeout=0");
    assert_eq!(presence_of(&s, &alice, &bob_id), "online");
    // The laptop says offline (explicitly, then by syncing with set_presence=offline): the
    // phone, which synced a moment ago, keeps bob online.
    put_presence(&s, &laptop, &bob_id, "offline");
    assert_eq!(presence_of(&s, &alice, &bob_id), "online");
    s.sync(&laptop, "timeout=0&set_presence=offline");
    assert_eq!(presence_of(&s, &alice, &bob_id), "online");
    // The laptop goes unavailable: online still wins.
    put_presence(&s, &laptop, &bob_id, "unavailable");
    assert_eq!(presence_of(&s, &alice, &bob_id), "online");
    // The phone stops syncing: 31 s later only the laptop's state is left...
    clock.advance(20_000);
    put_presence(&s, &laptop, &bob_id, "unavailable");
    clock.advance(11_000);
    assert_eq!(presence_of(&s, &alice, &bob_id), "unavailable");
    // ...and once the laptop is quiet too, bob is offline.
    clock.advance(31_000);
    assert_eq!(presence_of(&s, &alice, &bob_id), "offline");
    s.sync(&phone, "timeout=0");
    assert_eq!(presence_of(&s, &alice, &bob_id), "online");
}

fn presence_events(sync: &Value) -> Vec<(String, String)> {
    sync["presence"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["sender"].as_str().unwrap_or_default().to_owned(),
                e["content"]["presence"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[test]
fn a_join_brings_the_joiners_presence_to_the_rooms_members() {
    let s = TestServer::start();
    let (alice_id, alice) = s.register("alice");
    let (bob_id, bob) = s.register("bob");
    let room = s.create_room(&alice, json!({ "preset": "public_chat" }));
    // Both online; alice's sync token is from after bob's change.
    let bob_since = s.sync(&bob, "timeout=0")["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    let alice_since = s.sync(&alice, "timeout=0")["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    s.join(&bob, &room);
    let v = s.sync(&alice, &format!("since={alice_since}&timeout=0"));
    assert!(
        presence_events(&v).contains(&(bob_id.clone(), "online".into())),
        "alice gets the joiner's presence: {v}"
    );
    let v = s.sync(&bob, &format!("since={bob_since}&timeout=0"));
    assert!(
        presence_events(&v).contains(&(alice_id, "online".into())),
        "the joiner gets alice's: {v}"
    );
}

#[test]
fn a_join_brings_presence_across_servers_both_ways() {
    use common::fed::{create_public_room, curl, register, Hearth};
    let a = Hearth::start();
    let b = Hearth::start();
    let (alice, alice_tok) = register(&a.url(), "alice");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let room = create_public_room(&a.url(), &alice_tok, None);
    let put = |base: &str, user: &str, token: &str, msg: &str| {
        let path = format!("{base}/_matrix/client/v3/presence/{}/status", enc(user));
        let body = json!({ "presence": "online", "status_msg": msg });
        assert_eq!(curl("PUT", &path, Some(token), Some(&body)).0, 200);
    };
    // Both online before they share a room: nothing is sent yet (no server to send to).
    put(&a.url(), &alice, &alice_tok, "on a");
    put(&b.url(), &bob, &bob_tok, "on b");
    std::thread::sleep(Duration::from_millis(300));
    let room_id: ruma::OwnedRoomId = room.as_str().try_into().unwrap();
    let via: ruma::OwnedServerName = a.server_name().as_str().try_into().unwrap();
    let bob_uid: ruma::OwnedUserId = bob.as_str().try_into().unwrap();
    smol::block_on(hearth::ops::federation::join_remote(
        b.hs.app(),
        &bob_uid,
        &room_id,
        std::slice::from_ref(&via),
    ))
    .expect("bob joins through a");
    // Each side hears of the other's status without anyone changing it (the next ping would
    // be 25 minutes away).
    let status_seen = |base: &str, token: &str, user: &str, msg: &str| {
        let path = format!("{base}/_matrix/client/v3/presence/{}/status", enc(user));
        until(&format!("{user}'s status on {base}"), || {
            let (st, v) = curl("GET", &path, Some(token), None);
            (st == 200 && v["status_msg"] == msg && v["presence"] == "online").then_some(())
        });
    };
    status_seen(&b.url(), &bob_tok, &alice, "on a");
    status_seen(&a.url(), &alice_tok, &bob, "on b");
}

fn wakeups(s: &TestServer) -> u64 {
    let text = ureq::get(&format!("{}/_hearth/metrics", s.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("hearth_sync_wakeups_total ")?.parse().ok())
        .unwrap()
}

#[test]
fn a_message_wakes_a_parked_sync_once_with_its_counts() {
    let s = TestServer::start();
    let (room, alice, _, bob) = room_of_two(&s);
    // Settled: the join's evaluation is done and synced past.
    let mut since = String::new();
    until("a quiet sync", || {
        let q = match since.as_str() {
            "" => "timeout=0".to_owned(),
            t => format!("since={t}&timeout=300"),
        };
        let v = s.sync(&bob, &q);
        let quiet = !since.is_empty() && v["rooms"]["join"].get(&room).is_none();
        since = v["next_batch"].as_str().unwrap().to_owned();
        quiet.then_some(())
    });
    for i in 0..3 {
        let before = wakeups(&s);
        let (base, token, from) = (s.base.clone(), bob.clone(), since.clone());
        let parked = std::thread::spawn(move || {
            let url = format!("{base}/_matrix/client/v3/sync?since={from}&timeout=10000");
            ureq::get(&url)
                .set("Authorization", &format!("Bearer {token}"))
                .call()
                .unwrap()
                .into_json::<Value>()
                .unwrap()
        });
        std::thread::sleep(Duration::from_millis(300));
        let id = message(
            &s,
            &alice,
            &room,
            json!({ "msgtype": "m.text", "body": "hi" }),
        );
        let v = parked.join().unwrap();
        let joined = &v["rooms"]["join"][&room];
        let events: Vec<&str> = joined["timeline"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["event_id"].as_str())
            .collect();
        assert_eq!(events, [id.as_str()], "{v}");
        assert_eq!(
            joined["unread_notifications"]["notification_count"],
            json!(i + 1),
            "the counts come with the message: {v}"
        );
        since = v["next_batch"].as_str().unwrap().to_owned();
        // Nothing else is due: the next long-poll waits out its timeout.
        let t = Instant::now();
        let v = s.sync(&bob, &format!("since={since}&timeout=1000"));
        assert!(
            v["rooms"]["join"].get(&room).is_none() && t.elapsed() >= Duration::from_millis(900),
            "a second wake-up for the same message: {v}"
        );
        since = v["next_batch"].as_str().unwrap().to_owned();
        assert_eq!(wakeups(&s) - before, 1, "one wake-up per message");
    }
    // A sync with nothing to count does not wait for the evaluator (whose own write, the
    // counts, is no event): the median of a few immediate syncs is well under its 200 ms.
    let mut took: Vec<Duration> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let v = s.sync(&bob, &format!("since={since}&timeout=0"));
            since = v["next_batch"].as_str().unwrap().to_owned();
            t.elapsed()
        })
        .collect();
    took.sort();
    assert!(took[2] < Duration::from_millis(150), "{took:?}");
}
