//! Crashes and outages between Hearth and a real Synapse 1.163: nothing is lost or doubled.
//!
//! Hearth runs as its own process (the `hearth` binary) so it can be killed with SIGKILL and
//! started again on the same database; this file starts its own Synapse (never the shared one
//! of `scripts/test.sh`), because one of its tests stops and restarts it. The tests share that
//! Synapse one at a time; the last one to finish stops it.

mod common;

use common::{
    enc,
    fed::{curl, register, HearthProcess},
    synapse::{eventually, room_bodies, PerFile, Synapse},
};

use serde_json::json;

/// This file's own Synapse (a test stops and restarts it); the last test stops it for good.
static SYNAPSE: PerFile = PerFile::new(TESTS, Synapse::start);

/// Tests in this file that take a turn with the Synapse.
const TESTS: usize = 3;

/// A public room on Hearth (alice), joined from Synapse by `bob`: (room, alice's token, bob's
/// token). Proves the link works both ways before the test breaks it.
fn room_with_synapse_user(h: &HearthProcess, syn: &Synapse, bob: &str) -> (String, String, String) {
    let (_, alice_tok) = register(&h.url(), "alice");
    let (_, bob_tok) = register(&syn.url(), bob);
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", h.url()),
        Some(&alice_tok),
        Some(&json!({ "preset": "public_chat" })),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            syn.url(),
            enc(&room),
            enc(&h.server_name())
        ),
        Some(&bob_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "Synapse joins the Hearth room: {v}");
    send(&h.url(), &alice_tok, &room, "from hearth");
    send(&syn.url(), &bob_tok, &room, "from synapse");
    eventually(30, "the first messages cross", || {
        (syn.bodies(&bob_tok, &room, 20)
            .contains(&"from hearth".to_owned())
            && room_bodies(&h.url(), &alice_tok, &room, 20).contains(&"from synapse".to_owned()))
        .then_some(())
    });
    (room, alice_tok, bob_tok)
}

fn send(base: &str, token: &str, room: &str, body: &str) {
    let (s, v) = curl(
        "PUT",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
            enc(room),
            enc(body)
        ),
        Some(token),
        Some(&json!({ "msgtype": "m.text", "body": body })),
    );
    assert_eq!(s, 200, "send {body:?} at {base}: {v}");
}

/// Waits until `seen()` holds every one of `expected` (bodies with `prefix`), then checks it
/// holds each exactly once and in order.
fn all_once_in_order(
    what: &str,
    expected: &[String],
    prefix: &str,
    secs: u64,
    mut seen: impl FnMut() -> Vec<String>,
) {
    let got = eventually(secs, what, || {
        let got: Vec<String> = seen()
            .into_iter()
            .filter(|b| b.starts_with(prefix))
            .collect();
        expected.iter().all(|e| got.contains(e)).then_some(got)
    });
    assert_eq!(got, expected, "{what}: every message once, in order");
}

#[test]
fn synapse_stopped_then_restarted_receives_every_message_in_order_once() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let h = HearthProcess::start();
    let (room, alice_tok, bob_tok) = room_with_synapse_user(&h, syn, "bob_outage");

    // Synapse is down while alice writes more than one transaction's worth (50 PDUs).
    syn.stop();
    let expected: Vec<String> = (0..60).map(|i| format!("offline {i:02}")).collect();
    for body in &expected {
        send(&h.url(), &alice_tok, &room, body);
    }
    syn.restart();
    // Hearth's sender retries on its own (its backoff is at most a few tens of seconds).
    all_once_in_order("Synapse catches up", &expected, "offline ", 120, || {
        syn.bodies(&bob_tok, &room, 200)
    });
    drop(h);
}

#[test]
fn hearth_killed_during_a_burst_from_synapse_gets_every_message_once() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let mut h = HearthProcess::start();
    let (room, alice_tok, bob_tok) = room_with_synapse_user(&h, syn, "bob_burst");

    // Bob sends a burst; Hearth is SIGKILLed while Synapse is pushing it.
    let expected: Vec<String> = (0..90).map(|i| format!("burst {i:02}")).collect();
    for (i, body) in expected.iter().enumerate() {
        send(&syn.url(), &bob_tok, &room, body);
        if i == 12 {
            h.kill9();
        }
    }
    h.restart();
    // Synapse backs off from a server that failed; any signed request from that server
    // clears the backoff (Synapse's federation Authenticator), as a user of it looking up a
    // profile there does. Synapse then catches up, and Hearth fetches the gap it left with
    // /get_missing_events.
    let (s, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/profile/{}",
            h.url(),
            enc(&format!("@bob_burst:{}", syn.server_name()))
        ),
        Some(&alice_tok),
        None,
    );
    assert_eq!(s, 200, "{v}");
    all_once_in_order("Hearth catches up", &expected, "burst ", 120, || {
        room_bodies(&h.url(), &alice_tok, &room, 200)
    });
    // And alice's /sync timeline (what clients see) has each once.
    let (_, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/sync?timeout=0&filter={}",
            h.url(),
            enc(&json!({ "room": { "timeline": { "limit": 200 } } }).to_string())
        ),
        Some(&alice_tok),
        None,
    );
    let timeline: Vec<String> = common::timeline_bodies(&v, &room)
        .into_iter()
        .filter(|b| b.starts_with("burst "))
        .collect();
    assert_eq!(timeline, expected, "{}", h.log_tail());
}

#[test]
fn hearth_killed_while_sending_a_burst_to_synapse_loses_and_doubles_nothing() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let mut h = HearthProcess::start();
    let (room, alice_tok, bob_tok) = room_with_synapse_user(&h, syn, "bob_reader");

    // Thirty messages at once, so the sender has a backlog: each got its 200 (it is on disk,
    // and so is its outbox row) before the kill, which lands while transactions are in
    // flight.
    let all: Vec<String> = (0..60).map(|i| format!("crash {i:02}")).collect();
    std::thread::scope(|s| {
        for body in &all[..30] {
            let (url, tok, room) = (h.url(), &alice_tok, &room);
            s.spawn(move || send(&url, tok, room, body));
        }
    });
    h.kill9();
    let pending = h.outbox_rows();
    eprintln!("outbox rows at the kill: {pending}");
    assert!(
        pending > 0,
        "everything was sent before the kill: this run proves nothing about a crash mid-way"
    );
    h.restart();
    for body in &all[30..] {
        send(&h.url(), &alice_tok, &room, body);
    }
    // The order is Hearth's (the concurrent sends raced); it must hold each exactly once.
    let order: Vec<String> = room_bodies(&h.url(), &alice_tok, &room, 100)
        .into_iter()
        .filter(|b| b.starts_with("crash "))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, all, "Hearth holds each message once");
    all_once_in_order(
        "Synapse gets the whole burst",
        &order,
        "crash ",
        120,
        || syn.bodies(&bob_tok, &room, 200),
    );
}
