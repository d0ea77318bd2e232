//! Sticky events (MSC4354) between Hearth servers: each server pushes its own sticky events to
//! a server that joins later (old and new ones), to a server back from an outage, and a sticky
//! event soft-failed during a concurrent kick is delivered once the sender's membership is
//! restored. Every server is its own process (`HearthProcess`), so one can be stopped.

mod common;

use common::fed::{curl, register, HearthProcess};
use common::synapse::eventually;
use serde_json::{json, Value};

const PARAM: &str = "org.matrix.msc4354.sticky_duration_ms";
const HOUR: u64 = 3_600_000;

/// Sends a sticky event (`ms` long) and returns its ID.
fn send_sticky(h: &HearthProcess, tok: &str, room: &str, txn: &str, ms: u64) -> String {
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/org.example.call.member/{txn}?{PARAM}={ms}",
            h.url(),
            common::enc(room)
        ),
        Some(tok),
        Some(&json!({ "sticky_key": txn })),
    );
    assert_eq!(s, 200, "sticky send {txn}: {v}");
    v["event_id"].as_str().unwrap().to_owned()
}

fn send_msg(h: &HearthProcess, tok: &str, room: &str, txn: &str) -> (u16, Value) {
    curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            h.url(),
            common::enc(room)
        ),
        Some(tok),
        Some(&json!({ "msgtype": "m.text", "body": txn })),
    )
}

fn create_public_room(h: &HearthProcess, tok: &str) -> String {
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", h.url()),
        Some(tok),
        Some(&json!({ "preset": "public_chat", "room_version": "10" })),
    );
    assert_eq!(s, 200, "{v}");
    v["room_id"].as_str().unwrap().to_owned()
}

fn join_via(h: &HearthProcess, tok: &str, room: &str, via: &HearthProcess) {
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            h.url(),
            common::enc(room),
            common::enc(&via.server_name())
        ),
        Some(tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "join through {}: {v}", via.server_name());
}

/// What a client following one `/sync` stream has seen of a room: its sticky section and
/// timeline, accumulated across responses.
struct Follower {
    since: Option<String>,
    sticky: Vec<Value>,
    timeline: Vec<Value>,
}

impl Follower {
    fn new() -> Self {
        Self {
            since: None,
            sticky: Vec::new(),
            timeline: Vec::new(),
        }
    }

    /// One sync (timeline limit 5, so older events come only through the sticky section).
    fn sync(&mut self, h: &HearthProcess, tok: &str, room: &str) {
        let filter = common::enc(r#"{"room":{"timeline":{"limit":5}}}"#);
        let q = self
            .since
            .as_ref()
            .map(|s| format!("&since={s}"))
            .unwrap_or_default();
        let (s, v) = curl(
            "GET",
            &format!(
                "{}/_matrix/client/v3/sync?timeout=500&filter={filter}{q}",
                h.url()
            ),
            Some(tok),
            None,
        );
        assert_eq!(s, 200, "{v}");
        let r = &v["rooms"]["join"][room];
        for (into, section) in [
            (&mut self.sticky, &r["msc4354_sticky"]["events"]),
            (&mut self.timeline, &r["timeline"]["events"]),
        ] {
            into.extend(section.as_array().into_iter().flatten().cloned());
        }
        self.since = v["next_batch"].as_str().map(str::to_owned);
    }

    fn sticky_event(&self, id: &str) -> Option<&Value> {
        self.sticky.iter().find(|e| e["event_id"] == id)
    }

    fn seen(&self, id: &str) -> bool {
        self.sticky_event(id).is_some() || self.timeline.iter().any(|e| e["event_id"] == id)
    }

    /// Syncs until every one of `ids` was seen (bounded).
    fn until_seen(&mut self, h: &HearthProcess, tok: &str, room: &str, ids: &[&str], what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
        loop {
            self.sync(h, tok, room);
            if ids.iter().all(|id| self.seen(id)) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out: {what} (on {})",
                h.server_name()
            );
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    }
}

/// A sticky event as a client gets it: its duration in the event, the time left in
/// `unsigned`, the sender and content as sent.
fn assert_sticky_fields(ev: &Value, sender: &str, key: &str) {
    assert_eq!(ev["msc4354_sticky"]["duration_ms"], HOUR, "{ev}");
    assert_eq!(ev["sender"], sender, "{ev}");
    assert_eq!(ev["content"]["sticky_key"], key, "{ev}");
    let ttl = ev["unsigned"]["msc4354_sticky_duration_ttl_ms"]
        .as_u64()
        .unwrap_or_else(|| panic!("no ttl: {ev}"));
    assert!(ttl > 0 && ttl <= HOUR, "{ev}");
}

fn event_known(h: &HearthProcess, tok: &str, room: &str, id: &str) -> bool {
    curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/event/{}",
            h.url(),
            common::enc(room),
            common::enc(id)
        ),
        Some(tok),
        None,
    )
    .0 == 200
}

/// On a failing test, the servers' logs (without the `/sync` lines) go to
/// `$TMPDIR/sticky_federation-<test>-<n>.log`.
struct LogsOnFailure<'a>(&'static str, Vec<&'a HearthProcess>);

impl Drop for LogsOnFailure<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, h) in self.1.iter().enumerate() {
            let text = h.log();
            let kept: Vec<&str> = text.lines().filter(|l| !l.contains("v3/sync")).collect();
            let kept = kept.join("\n");
            let path = std::env::temp_dir().join(format!("sticky_federation-{}-{i}.log", self.0));
            let _ = std::fs::write(&path, kept);
            eprintln!("log of {}: {}", h.server_name(), path.display());
        }
    }
}

#[test]
fn two_servers_push_their_own_old_and_new_sticky_events_to_a_third_that_joins() {
    let a = HearthProcess::start();
    let b = HearthProcess::start();
    let c = HearthProcess::start();
    let (alice, alice_tok) = register(&a.url(), "alice");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let (_, carol_tok) = register(&c.url(), "carol");
    let _logs = LogsOnFailure("three", vec![&a, &b, &c]);
    let room = create_public_room(&a, &alice_tok);
    join_via(&b, &bob_tok, &room, &a);

    // Old sticky events, each followed by plain messages: nothing later names them.
    let old_a = send_sticky(&a, &alice_tok, &room, "old-a", HOUR);
    let old_b = send_sticky(&b, &bob_tok, &room, "old-b", HOUR);
    for i in 0..3 {
        assert_eq!(send_msg(&a, &alice_tok, &room, &format!("a{i}")).0, 200);
        assert_eq!(send_msg(&b, &bob_tok, &room, &format!("b{i}")).0, 200);
    }
    eventually(30, "a and b hold each other's sticky events", || {
        (event_known(&a, &alice_tok, &room, &old_b) && event_known(&b, &bob_tok, &room, &old_a))
            .then_some(())
    });

    // Carol joins from c through a; b learns of the join from a.
    join_via(&c, &carol_tok, &room, &a);
    let mut carol = Follower::new();
    carol.sync(&c, &carol_tok, &room);
    let new_a = send_sticky(&a, &alice_tok, &room, "new-a", HOUR);
    let new_b = send_sticky(&b, &bob_tok, &room, "new-b", HOUR);
    carol.until_seen(
        &c,
        &carol_tok,
        &room,
        &[&old_a, &old_b, &new_a, &new_b],
        "carol gets the old and new sticky events of a and b",
    );
    // The old ones predate carol's join: only the sticky section brings them.
    for (id, sender, key) in [(&old_a, &alice, "old-a"), (&old_b, &bob, "old-b")] {
        let ev = carol
            .sticky_event(id)
            .unwrap_or_else(|| panic!("{key} not in carol's sticky section"));
        assert_sticky_fields(ev, sender, key);
    }
    // Each once.
    let mut all: Vec<&Value> = carol.sticky.iter().collect();
    all.sort_by_key(|e| e["event_id"].as_str().map(str::to_owned));
    let n = all.len();
    all.dedup_by_key(|e| e["event_id"].clone());
    assert_eq!(
        n,
        all.len(),
        "a sticky event came twice: {:?}",
        carol.sticky
    );
    // c's /event serves them to carol (history visibility does not hide sticky events).
    for id in [&old_a, &old_b] {
        assert!(event_known(&c, &carol_tok, &room, id), "{id} on c");
    }
}

#[test]
fn a_peer_back_from_an_outage_gets_the_sticky_events_sent_while_it_was_down() {
    let a = HearthProcess::start();
    let mut b = HearthProcess::start();
    let (alice, alice_tok) = register(&a.url(), "alice");
    let (_, bob_tok) = register(&b.url(), "bob");
    let room = create_public_room(&a, &alice_tok);
    join_via(&b, &bob_tok, &room, &a);
    let mut bob = Follower::new();
    bob.sync(&b, &bob_tok, &room);

    b.kill9();
    // Sent while b is down: an old sticky event, then a queue longer than one transaction
    // (50 PDUs), then a new one.
    let early = send_sticky(&a, &alice_tok, &room, "early", HOUR);
    for i in 0..60 {
        assert_eq!(send_msg(&a, &alice_tok, &room, &format!("m{i}")).0, 200);
    }
    let late = send_sticky(&a, &alice_tok, &room, "late", HOUR);
    std::thread::sleep(std::time::Duration::from_secs(2));
    b.restart();

    eventually(90, "b gets the last event sent while it was down", || {
        event_known(&b, &bob_tok, &room, &late).then_some(())
    });
    // One sync after everything arrived: 60 messages lie between the early sticky event and
    // the timeline (limit 5).
    bob.sync(&b, &bob_tok, &room);
    assert!(bob.seen(&late));
    let ev = bob
        .sticky_event(&early)
        .unwrap_or_else(|| panic!("early not in the sticky section: {:?}", bob.sticky));
    assert_sticky_fields(ev, &alice, "early");
}

fn metric(h: &HearthProcess, name: &str) -> u64 {
    let out = common::fed::curl_command("GET", None)
        .arg(format!("{}/_hearth/metrics", h.url()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_sticky_event_soft_failed_during_a_concurrent_kick_is_delivered_after_re_evaluation() {
    let a = HearthProcess::start();
    let mut b = HearthProcess::start();
    let (_, alice_tok) = register(&a.url(), "alice");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let room = create_public_room(&a, &alice_tok);
    join_via(&b, &bob_tok, &room, &a);
    let mut alice = Follower::new();
    alice.sync(&a, &alice_tok, &room);

    // Alice kicks bob while b is down, and a's retries back off (two failures: the next
    // attempt is 10 s away), so b hears of the kick only after bob's sticky event. Any signed
    // request from b clears a's backoff at once, so b must owe a nothing when it goes down: its
    // resync of the room is over and its queue to a (bob's presence) is empty.
    eventually(30, "b is done with the room and owes a nothing", || {
        (metric(&b, "hearth_partial_state_rooms") == 0
            && metric(&b, "hearth_federation_queue_depth_total") == 0)
            .then_some(())
    });
    b.kill9();
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/kick",
            a.url(),
            common::enc(&room)
        ),
        Some(&alice_tok),
        Some(&json!({ "user_id": bob })),
    );
    assert_eq!(s, 200, "{v}");
    eventually(30, "a's sends to b fail twice", || {
        (metric(&a, "hearth_federation_failures_total") >= 2).then_some(())
    });
    b.restart();
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/org.example.call.member/concurrent?{PARAM}={HOUR}",
            b.url(),
            common::enc(&room)
        ),
        Some(&bob_tok),
        Some(&json!({ "sticky_key": "concurrent" })),
    );
    assert_eq!(
        s,
        200,
        "sticky send after the restart: {v}\n--- a:\n{}\n--- b:\n{}",
        a.log_tail(),
        b.log_tail()
    );
    let sticky = v["event_id"].as_str().unwrap().to_owned();

    // a takes it (soft-failed: bob is not in the room as a knows it) and delivers nothing.
    eventually(30, "b's transaction with it reached a", || {
        (metric(&b, "hearth_federation_transactions_total") >= 1).then_some(())
    });
    for _ in 0..3 {
        alice.sync(&a, &alice_tok, &room);
    }
    assert!(
        !alice.seen(&sticky),
        "a soft-failed sticky event reached alice"
    );
    assert!(!event_known(&a, &alice_tok, &room, &sticky));

    // b hears of the kick; bob joins again through a: the state change re-evaluates the
    // sticky event, which passes now.
    eventually(60, "b learns bob was kicked", || {
        (send_msg(&b, &bob_tok, &room, "refused").0 == 403).then_some(())
    });
    join_via(&b, &bob_tok, &room, &a);
    alice.until_seen(
        &a,
        &alice_tok,
        &room,
        &[&sticky],
        "alice gets bob's sticky event after his rejoin",
    );
    assert!(event_known(&a, &alice_tok, &room, &sticky));
}
