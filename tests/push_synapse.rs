//! Unread counts against a real Synapse 1.163 (`../shared/synapse-peer/`): the same sequence
//! of messages, mentions, edits, reactions, notices, threads and receipts between two users on
//! Synapse and two users on Hearth, and after every step both users' `notification_count` and
//! `highlight_count` must be the same on both servers. Synapse computes its counts while it
//! persists the event; Hearth's evaluator runs just after, so Hearth is polled (bounded) until
//! it reaches Synapse's numbers, and must stay there.

mod common;

use std::time::{Duration, Instant};

use common::{
    enc,
    fed::{curl, register, Hearth},
    synapse::{PerFile, Synapse},
};
use serde_json::{json, Value};

static SYNAPSE: PerFile = PerFile::new(TESTS, || {
    std::env::var("HEARTH_TEST_SYNAPSE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .map_or_else(Synapse::start, Synapse::shared)
});

/// Tests in this file that take a turn with the Synapse: bump it when adding one.
const TESTS: usize = 1;

/// Two users in a room on one server.
struct Side {
    base: String,
    alice: String,
    bob_id: String,
    bob: String,
    room: String,
    txn: u32,
}

impl Side {
    fn new(base: &str, tag: &str) -> Self {
        let (alice_id, alice) = register(base, &format!("alice{tag}"));
        let (bob_id, bob) = register(base, &format!("bob{tag}"));
        for (id, tok, name) in [(&alice_id, &alice, "Alice"), (&bob_id, &bob, "Bob")] {
            let (s, v) = curl(
                "PUT",
                &format!("{base}/_matrix/client/v3/profile/{}/displayname", enc(id)),
                Some(tok),
                Some(&json!({ "displayname": name })),
            );
            assert_eq!(s, 200, "{v}");
        }
        // Synapse makes version 12 rooms by default, which Hearth does not support.
        let (s, v) = curl(
            "POST",
            &format!("{base}/_matrix/client/v3/createRoom"),
            Some(&alice),
            Some(&json!({ "room_version": "10", "invite": [bob_id], "preset": "private_chat" })),
        );
        assert_eq!(s, 200, "{v}");
        let room = v["room_id"].as_str().unwrap().to_owned();
        let (s, v) = curl(
            "POST",
            &format!("{base}/_matrix/client/v3/join/{}", enc(&room)),
            Some(&bob),
            Some(&json!({})),
        );
        assert_eq!(s, 200, "{v}");
        Self {
            base: base.to_owned(),
            alice,
            bob_id,
            bob,
            room,
            txn: 0,
        }
    }

    fn token(&self, who: Who) -> &str {
        match who {
            Who::Alice => &self.alice,
            Who::Bob => &self.bob,
        }
    }

    fn send(&mut self, who: Who, kind: &str, content: Value) -> String {
        self.txn += 1;
        let (s, v) = curl(
            "PUT",
            &format!(
                "{}/_matrix/client/v3/rooms/{}/send/{kind}/t{}",
                self.base,
                enc(&self.room),
                self.txn
            ),
            Some(self.token(who)),
            Some(&content),
        );
        assert_eq!(s, 200, "{v}");
        v["event_id"].as_str().unwrap().to_owned()
    }

    fn receipt(&self, who: Who, kind: &str, event: &str, thread: Option<&str>) {
        let body = match thread {
            Some(t) => json!({ "thread_id": t }),
            None => json!({}),
        };
        let (s, v) = curl(
            "POST",
            &format!(
                "{}/_matrix/client/v3/rooms/{}/receipt/{kind}/{}",
                self.base,
                enc(&self.room),
                enc(event)
            ),
            Some(self.token(who)),
            Some(&body),
        );
        assert_eq!(s, 200, "{v}");
    }

    /// (notification_count, highlight_count) for Alice and Bob; `threads`: the main timeline's
    /// numbers with `unread_thread_notifications`, and the threads' summed.
    fn counts(&self, threads: bool) -> Vec<(u64, u64)> {
        // Synapse keeps a sync response for two minutes (`sync_response_cache_duration`)
        // and answers an identical request from it: every request differs in its limit.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let limit = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let filter = enc(&json!({ "room": { "timeline": {
            "limit": limit, "unread_thread_notifications": threads } } })
        .to_string());
        let mut out = Vec::new();
        for tok in [&self.alice, &self.bob] {
            let (s, v) = curl(
                "GET",
                &format!(
                    "{}/_matrix/client/v3/sync?timeout=0&filter={filter}",
                    self.base
                ),
                Some(tok),
                None,
            );
            assert_eq!(s, 200, "{v}");
            let r = &v["rooms"]["join"][self.room.as_str()];
            let n = |u: &Value| {
                (
                    u["notification_count"].as_u64().unwrap_or(0),
                    u["highlight_count"].as_u64().unwrap_or(0),
                )
            };
            out.push(n(&r["unread_notifications"]));
            if threads {
                let t = r["unread_thread_notifications"]
                    .as_object()
                    .map(|m| {
                        m.values()
                            .map(n)
                            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
                    })
                    .unwrap_or((0, 0));
                out.push(t);
            }
        }
        out
    }
}

#[derive(Clone, Copy)]
enum Who {
    Alice,
    Bob,
}

/// After a step: Hearth reaches Synapse's numbers within 20 s and keeps them.
fn same_counts(step: &str, syn: &Side, hearth: &Side) {
    for threads in [false, true] {
        let want = syn.counts(threads);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = hearth.counts(threads);
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{step} (threads: {threads}): Synapse {want:?}, Hearth {got:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(hearth.counts(false), syn.counts(false), "{step}: stable");
    eprintln!("{step}: {:?}", syn.counts(true));
}

/// One step on both servers; returns the event IDs (Synapse's, Hearth's).
fn both(syn: &mut Side, hearth: &mut Side, f: impl Fn(&mut Side) -> String) -> (String, String) {
    (f(syn), f(hearth))
}

fn text(body: &str) -> Value {
    json!({ "msgtype": "m.text", "body": body })
}

#[test]
fn unread_counts_match_synapse_for_the_same_sequence() {
    let turn = SYNAPSE.turn();
    let syn_server: &Synapse = &turn;
    let hearth_server = Hearth::start();
    let tag = std::process::id().to_string();
    let mut syn = Side::new(&syn_server.url(), &tag);
    let mut hearth = Side::new(&hearth_server.url(), &tag);
    same_counts("joined", &syn, &hearth);

    both(&mut syn, &mut hearth, |s| {
        s.send(Who::Alice, "m.room.message", text("hello"))
    });
    both(&mut syn, &mut hearth, |s| {
        s.send(Who::Alice, "m.room.message", text("hello again"))
    });
    let _ = both(&mut syn, &mut hearth, |s| {
        s.send(Who::Bob, "m.room.message", text("hi"))
    });
    same_counts("two messages, a reply", &syn, &hearth);

    both(&mut syn, &mut hearth, |s| {
        let bob = s.bob_id.clone();
        s.send(
            Who::Alice,
            "m.room.message",
            json!({ "msgtype": "m.text", "body": "ping", "m.mentions": { "user_ids": [bob] } }),
        )
    });
    same_counts("a user mention", &syn, &hearth);
    let (syn_room_ping, hearth_room_ping) = both(&mut syn, &mut hearth, |s| {
        s.send(
            Who::Alice,
            "m.room.message",
            json!({ "msgtype": "m.text", "body": "@room lunch", "m.mentions": { "room": true } }),
        )
    });
    same_counts("a room mention", &syn, &hearth);
    both(&mut syn, &mut hearth, |s| {
        s.send(Who::Alice, "m.room.message", text("Bob, are you there?"))
    });
    same_counts("a display name in the body (legacy rule)", &syn, &hearth);
    both(&mut syn, &mut hearth, |s| {
        s.send(
            Who::Alice,
            "m.room.message",
            json!({ "msgtype": "m.text", "body": "Bob, see above", "m.mentions": {} }),
        )
    });
    same_counts("a display name with empty m.mentions", &syn, &hearth);

    // Notices, edits and reactions do not notify.
    let (syn_hello, hearth_hello) = both(&mut syn, &mut hearth, |s| {
        s.send(Who::Alice, "m.room.message", text("typo"))
    });
    both(&mut syn, &mut hearth, |s| {
        s.send(
            Who::Alice,
            "m.room.message",
            json!({ "msgtype": "m.notice", "body": "bot" }),
        )
    });
    same_counts("a message and a notice", &syn, &hearth);
    for (side, target) in [(&mut syn, &syn_hello), (&mut hearth, &hearth_hello)] {
        side.send(
            Who::Alice,
            "m.room.message",
            json!({ "msgtype": "m.text", "body": "* fixed", "m.new_content": text("fixed"),
                    "m.relates_to": { "rel_type": "m.replace", "event_id": target } }),
        );
        side.send(
            Who::Alice,
            "m.reaction",
            json!({ "m.relates_to": { "rel_type": "m.annotation", "event_id": target, "key": "👍" } }),
        );
    }
    same_counts("an edit and a reaction", &syn, &hearth);

    // A private receipt on the room mention: only what came after it counts.
    syn.receipt(Who::Bob, "m.read.private", &syn_room_ping, None);
    hearth.receipt(Who::Bob, "m.read.private", &hearth_room_ping, None);
    same_counts("a private receipt", &syn, &hearth);

    // A thread: counted apart when the filter asks.
    let (syn_root, hearth_root) = both(&mut syn, &mut hearth, |s| {
        s.send(Who::Alice, "m.room.message", text("root"))
    });
    for (side, root) in [(&mut syn, &syn_root), (&mut hearth, &hearth_root)] {
        for body in ["in thread", "again in thread"] {
            side.send(
                Who::Alice,
                "m.room.message",
                json!({ "msgtype": "m.text", "body": body,
                        "m.relates_to": { "rel_type": "m.thread", "event_id": root } }),
            );
        }
    }
    same_counts("a thread", &syn, &hearth);

    // A public receipt on the latest event clears everything.
    let (syn_last, hearth_last) = both(&mut syn, &mut hearth, |s| {
        s.send(Who::Alice, "m.room.message", text("last"))
    });
    syn.receipt(Who::Bob, "m.read", &syn_last, None);
    hearth.receipt(Who::Bob, "m.read", &hearth_last, None);
    same_counts("a receipt on the latest", &syn, &hearth);
    both(&mut syn, &mut hearth, |s| {
        s.send(Who::Alice, "m.room.message", text("after the receipt"))
    });
    same_counts("a message after the receipt", &syn, &hearth);
}
