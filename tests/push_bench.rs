//! The cost of push-rule evaluation in a 1,000-member room (`bench/push.sh` runs this in
//! release mode; ignored in the normal suite). Prints `BENCH` lines:
//! - one message evaluated for every member (`ops::push::evaluate`, the evaluator's read),
//!   cold (rule sets parsed) and warm (the evaluator's cache), as the median of 20 runs;
//! - send throughput into the room with evaluation on and off (`push.evaluate`), 4 clients,
//!   and how long the evaluator takes to catch up with a burst.

mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{enc, TestServer};
use hearth::{
    ops::push::{evaluate, RulesCache},
    store::{push as sp, queries as q},
};
use ruma::{OwnedRoomId, OwnedUserId};
use serde_json::json;

const MEMBERS: usize = 1000;
const SENDS: usize = 400;
const CLIENTS: usize = 4;

/// A room with Alice and `MEMBERS` local members; returns (server, room, Alice's token).
fn big_room(evaluate: bool) -> (TestServer, String, String) {
    let s = TestServer::start_with(|c| c.push.evaluate = evaluate);
    let (_, alice) = s.register("alice");
    let room = s.create_room(&alice, json!({ "preset": "public_chat" }));
    let app = s.hs().app().clone();
    let room_id = OwnedRoomId::try_from(room.as_str()).unwrap();
    let t = Instant::now();
    for i in 0..MEMBERS {
        let uid: OwnedUserId = s.hs().create_user(&format!("m{i}"), None, false).unwrap();
        smol::block_on(hearth::ops::rooms::join(&app, &room_id, &uid, None, vec![])).unwrap();
    }
    eprintln!("setup: {MEMBERS} members joined in {:?}", t.elapsed());
    s.send(&alice, &room, "setup", "everyone is here");
    caught_up(&s);
    (s, room, alice)
}

/// Waits until the evaluator's stored position has passed every event (the last event must
/// notify someone: batches that find nothing are not stored); returns when that was.
fn caught_up(s: &TestServer) -> Instant {
    let app = s.hs().app().clone();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let behind = smol::block_on(app.store.read(|c| {
            let done = sp::get_push_pos(c)?;
            Ok(sp::list_events_after(c, done, 1)?.len())
        }))
        .unwrap();
        if behind == 0 {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "the evaluator did not catch up");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn send_burst(s: &TestServer, room: &str, token: &str) -> Duration {
    let t = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (base, room, token) = (s.base.clone(), room.to_owned(), token.to_owned());
            std::thread::spawn(move || {
                for i in 0..SENDS / CLIENTS {
                    let url = format!(
                        "{base}/_matrix/client/v3/rooms/{}/send/m.room.message/c{k}-{i}",
                        enc(&room)
                    );
                    ureq::put(&url)
                        .set("Authorization", &format!("Bearer {token}"))
                        .send_json(json!({ "msgtype": "m.text", "body": format!("burst {k} {i}") }))
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    t.elapsed()
}

#[test]
#[ignore]
fn bench_push_evaluation_in_a_1000_member_room() {
    let (s, room, alice) = big_room(true);
    let app = s.hs().app().clone();
    let server = s.hs().server_name().to_owned();

    // One message, evaluated again and again at its position.
    let ev = s.send(&alice, &room, "one", "hello everyone");
    caught_up(&s);
    let pos = smol::block_on(
        app.store
            .read(move |c| Ok(q::get_event(c, &ev)?.map_or(0, |r| r.pos))),
    )
    .unwrap();
    let mut runs = Vec::new();
    let cache = Arc::new(RulesCache::default());
    for i in 0..21 {
        let (server, cache) = (server.clone(), cache.clone());
        let t = Instant::now();
        let batch = smol::block_on(
            app.store
                .read(move |c| evaluate(c, &server, &cache, pos - 1, pos - 1)),
        )
        .unwrap();
        let took = t.elapsed();
        assert_eq!(batch.found.len(), MEMBERS, "every member is notified");
        if i == 0 {
            eprintln!(
                "BENCH evaluate one message for {MEMBERS} members, cold (rules parsed): {:.1} ms",
                took.as_secs_f64() * 1e3
            );
        } else {
            runs.push(took);
        }
    }
    runs.sort();
    let median = runs[runs.len() / 2];
    eprintln!(
        "BENCH evaluate one message for {MEMBERS} members, warm: median {:.1} ms ({:.1} µs per member; min {:.1} ms, max {:.1} ms)",
        median.as_secs_f64() * 1e3,
        median.as_secs_f64() * 1e6 / MEMBERS as f64,
        runs[0].as_secs_f64() * 1e3,
        runs[runs.len() - 1].as_secs_f64() * 1e3,
    );

    // Sends with the evaluator running beside them.
    let sent = Instant::now();
    let took = send_burst(&s, &room, &alice);
    let done = caught_up(&s);
    eprintln!(
        "BENCH sends with evaluation: {SENDS} messages by {CLIENTS} clients in {:.2} s = {:.0} msg/s; evaluator caught up {:.2} s after the first send ({:.0} msg/s evaluated, {:.0} member evaluations/s)",
        took.as_secs_f64(),
        SENDS as f64 / took.as_secs_f64(),
        (done - sent).as_secs_f64(),
        SENDS as f64 / (done - sent).as_secs_f64(),
        (SENDS * MEMBERS) as f64 / (done - sent).as_secs_f64(),
    );
    drop(s);

    let (s, room, alice) = big_room(false);
    let took = send_burst(&s, &room, &alice);
    eprintln!(
        "BENCH sends without evaluation (push.evaluate = false): {SENDS} messages by {CLIENTS} clients in {:.2} s = {:.0} msg/s",
        took.as_secs_f64(),
        SENDS as f64 / took.as_secs_f64(),
    );
}
