//! Room history: `/messages` and `/context` page by topology (depth, then stream position),
//! `end` is given while more might follow and only then, stream tokens from `/sync` still
//! work, and history a server lacks (a room joined through another server) is backfilled
//! from that server: once for all waiters, in order, and never re-sent by `/sync`.

mod common;

use std::collections::HashSet;

use common::{enc, fed, TestServer};
use serde_json::{json, Value};

/// Pages `/messages` from `from` in `dir` until `end` is absent; every response's events in
/// order. Bounded: panics after 200 pages.
fn page_all(get: &dyn Fn(&str) -> Value, dir: &str, from: Option<&str>, extra: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut from = from.map(str::to_owned);
    for _ in 0..200 {
        let mut q = format!("dir={dir}{extra}");
        if let Some(f) = &from {
            q.push_str(&format!("&from={}", enc(f)));
        }
        let v = get(&q);
        out.extend(v["chunk"].as_array().expect("a chunk").iter().cloned());
        match v["end"].as_str() {
            Some(e) => from = Some(e.to_owned()),
            None => return out,
        }
    }
    panic!("no end after 200 pages");
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect()
}

fn bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

fn assert_unique(events: &[Value]) {
    let set: HashSet<String> = ids(events).into_iter().collect();
    assert_eq!(set.len(), events.len(), "an event came twice");
}

#[test]
fn paging_reaches_the_room_creation_both_ways_with_filters() {
    let s = TestServer::start();
    let (_, tok) = s.register("alice");
    let room = s.create_room(&tok, json!({ "preset": "private_chat" }));
    let mut sent = Vec::new();
    for i in 0..25 {
        sent.push(s.send(&tok, &room, &format!("m{i}"), &format!("msg {i}")));
        if i % 8 == 0 {
            s.ok(
                "PUT",
                &format!(
                    "/_matrix/client/v3/rooms/{}/state/m.room.topic/",
                    enc(&room)
                ),
                Some(&tok),
                Some(&json!({ "topic": format!("topic {i}") })),
            );
        }
    }
    let get = |q: &str| {
        s.ok(
            "GET",
            &format!("/_matrix/client/v3/rooms/{}/messages?{q}", enc(&room)),
            Some(&tok),
            None,
        )
    };

    // Backwards from the latest event, 7 at a time: every event once, down to the creation.
    let back = page_all(&get, "b", None, "&limit=7");
    assert_unique(&back);
    assert_eq!(back.last().unwrap()["type"], "m.room.create");
    let expected: Vec<String> = (0..25).rev().map(|i| format!("msg {i}")).collect();
    assert_eq!(bodies(&back), expected);
    assert_eq!(
        back.iter().filter(|e| e["type"] == "m.room.topic").count(),
        4
    );

    // Forwards from the room's beginning: the same events, in the opposite order, and the
    // last page has no `end` (the latest event was reached).
    let fwd = page_all(&get, "f", None, "&limit=7");
    let mut rev = ids(&back);
    rev.reverse();
    assert_eq!(ids(&fwd), rev);

    // A filter dropping most rows: pages hold only what it allows and still reach the end.
    let only_topics = enc(&json!({ "types": ["m.room.topic"] }).to_string());
    let topics = page_all(&get, "b", None, &format!("&limit=1&filter={only_topics}"));
    let t: Vec<&str> = topics
        .iter()
        .map(|e| e["content"]["topic"].as_str().unwrap())
        .collect();
    assert_eq!(t, ["topic 24", "topic 16", "topic 8", "topic 0"]);
    let only_msgs = enc(&json!({ "types": ["m.room.message"] }).to_string());
    let msgs = page_all(&get, "f", None, &format!("&limit=4&filter={only_msgs}"));
    let mut exp = expected.clone();
    exp.reverse();
    assert_eq!(bodies(&msgs), exp);
    assert_eq!(msgs.len(), 25);

    // A filter nothing passes: one page, empty, and no `end` (the creation was reached).
    let none = enc(&json!({ "types": ["nothing.at.all"] }).to_string());
    let v = get(&format!("dir=b&filter={none}"));
    assert_eq!(v["chunk"], json!([]));
    assert!(v.get("end").is_none(), "{v}");

    // A full last page that ends at the creation gives no `end` either; one that does not
    // reach it does.
    let all = back.len();
    let v = get(&format!("dir=b&limit={all}"));
    assert_eq!(v["chunk"].as_array().unwrap().len(), all);
    assert!(v.get("end").is_none(), "{v}");
    let v = get(&format!("dir=b&limit={}", all - 1));
    assert!(v["end"].is_string(), "{v}");

    // Tokens: topological ones (`t<depth>-<pos>`), old stream ones (`t<pos>`) and `/sync`'s
    // `next_batch` are accepted; garbage is M_INVALID_PARAM.
    assert!(v["end"].as_str().unwrap().contains('-'));
    let sync = s.sync(&tok, "");
    let next = sync["next_batch"].as_str().unwrap();
    let from_sync = page_all(&get, "b", Some(next), "&limit=50");
    assert_eq!(ids(&from_sync), ids(&back));
    let (st, e) = s.req(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&from=tx-y",
            enc(&room)
        ),
        Some(&tok),
        None,
    );
    assert_eq!((st, e["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
    let _ = sent;
}

#[test]
fn sync_prev_batch_continues_where_the_timeline_starts() {
    let s = TestServer::start();
    let (_, tok) = s.register("alice");
    let room = s.create_room(&tok, json!({}));
    for i in 0..12 {
        s.send(&tok, &room, &format!("t{i}"), &format!("msg {i}"));
    }
    let filter = enc(&json!({ "room": { "timeline": { "limit": 3 } } }).to_string());
    let sync = s.sync(&tok, &format!("filter={filter}"));
    let tl = &sync["rooms"]["join"][&room]["timeline"];
    assert_eq!(tl["limited"], true);
    let seen = bodies(tl["events"].as_array().unwrap());
    assert_eq!(seen, ["msg 9", "msg 10", "msg 11"]);
    let get = |q: &str| {
        s.ok(
            "GET",
            &format!("/_matrix/client/v3/rooms/{}/messages?{q}", enc(&room)),
            Some(&tok),
            None,
        )
    };
    let older = page_all(&get, "b", tl["prev_batch"].as_str(), "&limit=4");
    let expected: Vec<String> = (0..9).rev().map(|i| format!("msg {i}")).collect();
    assert_eq!(bodies(&older), expected);
    assert_eq!(older.last().unwrap()["type"], "m.room.create");
    assert_unique(&older);

    // `/context` hands out topological tokens that `/messages` continues from.
    let mid = older[4]["event_id"].as_str().unwrap().to_owned();
    let ctx = s.ok(
        "GET",
        &format!(
            "/_matrix/client/v3/rooms/{}/context/{}?limit=2",
            enc(&room),
            enc(&mid)
        ),
        Some(&tok),
        None,
    );
    assert_eq!(ctx["event"]["content"]["body"], "msg 4");
    assert_eq!(bodies(ctx["events_before"].as_array().unwrap()), ["msg 3"]);
    assert_eq!(bodies(ctx["events_after"].as_array().unwrap()), ["msg 5"]);
    let before = page_all(&get, "b", ctx["start"].as_str(), "&limit=2");
    assert_eq!(bodies(&before), ["msg 2", "msg 1", "msg 0"]);
    let after = page_all(&get, "f", ctx["end"].as_str(), "&limit=5");
    let exp: Vec<String> = (6..12).map(|i| format!("msg {i}")).collect();
    assert_eq!(bodies(&after), exp);
}

/// Two Hearths: alice's room on `a` with `n` messages; bob of `b` joins through `a`.
struct Joined {
    a: fed::Hearth,
    b: fed::Hearth,
    alice: String,
    bob: String,
    room: String,
}

fn joined_after(n: usize, history_visibility: &str) -> Joined {
    let a = fed::Hearth::start();
    let b = fed::Hearth::start();
    let (_, alice) = fed::register(&a.url(), "alice");
    let (_, bob) = fed::register(&b.url(), "bob");
    let (st, v) = fed::curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", a.url()),
        Some(&alice),
        Some(&json!({
            "preset": "public_chat",
            "initial_state": [{ "type": "m.room.history_visibility", "state_key": "",
                                "content": { "history_visibility": history_visibility } }],
        })),
    );
    assert_eq!(st, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    for i in 0..n {
        let (st, v) = fed::curl(
            "PUT",
            &format!(
                "{}/_matrix/client/v3/rooms/{}/send/m.room.message/h{i}",
                a.url(),
                enc(&room)
            ),
            Some(&alice),
            Some(&json!({ "msgtype": "m.text", "body": format!("msg {i}") })),
        );
        assert_eq!(st, 200, "{v}");
    }
    let (st, v) = fed::curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            b.url(),
            enc(&room),
            enc(&a.server_name())
        ),
        Some(&bob),
        Some(&json!({})),
    );
    assert_eq!(st, 200, "{v}");
    Joined {
        a,
        b,
        alice,
        bob,
        room,
    }
}

fn messages(base: &str, tok: &str, room: &str, q: &str) -> Value {
    let (st, v) = fed::curl(
        "GET",
        &format!("{base}/_matrix/client/v3/rooms/{}/messages?{q}", enc(room)),
        Some(tok),
        None,
    );
    assert_eq!(st, 200, "{v}");
    v
}

#[test]
fn a_remote_room_is_backfilled_back_to_its_creation() {
    // More than one `/backfill` holds (100 events): the first batch's oldest events build on
    // the state `/state_ids` gave for them.
    let j = joined_after(130, "shared");
    let sync = |since: Option<&str>| {
        let q = since.map(|s| format!("?since={s}")).unwrap_or_default();
        let (st, v) = fed::curl(
            "GET",
            &format!("{}/_matrix/client/v3/sync{q}", j.b.url()),
            Some(&j.bob),
            None,
        );
        assert_eq!(st, 200, "{v}");
        v
    };
    // Joined with partial state: a sync not lazy-loading members shows the room once the
    // resync is done.
    let first = common::synapse::eventually(30, "the room is in bob's sync", || {
        let v = sync(None);
        v["rooms"]["join"].get(&j.room).is_some().then_some(v)
    });
    let tl = &first["rooms"]["join"][&j.room]["timeline"];
    let seen = ids(tl["events"].as_array().unwrap());
    assert!(!seen.is_empty(), "{first}");
    let prev = tl["prev_batch"].as_str().unwrap().to_owned();

    let get = |q: &str| messages(&j.b.url(), &j.bob, &j.room, q);
    let back = page_all(&get, "b", Some(&prev), "&limit=25");
    assert_unique(&back);
    let expected: Vec<String> = (0..130).rev().map(|i| format!("msg {i}")).collect();
    assert_eq!(bodies(&back), expected, "every message once, newest first");
    assert_eq!(back.last().unwrap()["type"], "m.room.create");
    for id in &seen {
        assert!(!ids(&back).contains(id), "the timeline came again");
    }
    // Backfilled history has its state: `/context` of old and recent messages shows it.
    for e in back
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .step_by(20)
    {
        let (st, ctx) = fed::curl(
            "GET",
            &format!(
                "{}/_matrix/client/v3/rooms/{}/context/{}?limit=0",
                j.b.url(),
                enc(&j.room),
                enc(e["event_id"].as_str().unwrap())
            ),
            Some(&j.bob),
            None,
        );
        assert_eq!(st, 200, "{ctx}");
        let state = ctx["state"].as_array().unwrap();
        assert!(
            state.iter().any(|s| s["type"] == "m.room.create")
                && state.iter().any(|s| s["type"] == "m.room.power_levels"),
            "state at {}: {ctx}",
            e["content"]["body"]
        );
    }

    // Forwards from the room's beginning: the same history, then what the timeline showed.
    let fwd = page_all(&get, "f", None, "&limit=16");
    let mut expect_fwd = ids(&back);
    expect_fwd.reverse();
    expect_fwd.extend(seen.iter().cloned());
    assert_eq!(ids(&fwd), expect_fwd);

    // What was backfilled is history: an incremental sync carries only what is new.
    let next = first["next_batch"].as_str().unwrap().to_owned();
    let (st, v) = fed::curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/late",
            j.a.url(),
            enc(&j.room)
        ),
        Some(&j.alice),
        Some(&json!({ "msgtype": "m.text", "body": "after the backfill" })),
    );
    assert_eq!(st, 200, "{v}");
    let mut got = Vec::new();
    let mut since = next;
    for _ in 0..40 {
        let v = sync(Some(&format!("{since}&timeout=500")));
        since = v["next_batch"].as_str().unwrap().to_owned();
        got.extend(common::timeline_bodies(&v, &j.room));
        if !got.is_empty() {
            break;
        }
    }
    assert_eq!(got, ["after the backfill"]);
}

#[test]
fn a_backfill_dropped_by_its_waiter_still_completes_for_the_next() {
    let j = joined_after(20, "shared");
    let app = j.b.hs.app().clone();
    let room: ruma::OwnedRoomId = j.room.as_str().try_into().unwrap();
    let held = |app: &hearth::App| {
        let r = j.room.clone();
        smol::block_on(app.store.read(move |c| {
            Ok(hearth::store::history::list_room_events_topo(
                c,
                &r,
                &Default::default(),
                1000,
                true,
            )?
            .len())
        }))
        .unwrap()
    };
    let before = held(&app);
    let r = j.room.clone();
    let ext = smol::block_on(
        app.store
            .read(move |c| hearth::store::history::list_backward_extremities(c, &r, 20)),
    )
    .unwrap();
    assert!(!ext.is_empty(), "the join's prev events are missing");

    // Waiters dropped after each of their first few polls: the shared backfill goes on.
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    for polls in 1..=4 {
        let mut fut = Box::pin(hearth::ops::federation::backfill_shared(
            &app,
            &room,
            ext.clone(),
        ));
        for _ in 0..polls {
            if std::future::Future::poll(fut.as_mut(), &mut cx).is_ready() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(fut);
        // Never half a batch: nothing yet, or all of it.
        let now = held(&app);
        assert!(now == before || now > before + 20, "{before} → {now}");
    }
    let n = smol::block_on(hearth::ops::federation::backfill_shared(&app, &room, ext))
        .expect("the backfill completes");
    assert!(n > 20, "{n} events backfilled");
    let after = held(&app);
    assert_eq!(after, before + n);
    let back = page_all(
        &|q| messages(&j.b.url(), &j.bob, &j.room, q),
        "b",
        None,
        "&limit=50",
    );
    let expected: Vec<String> = (0..20).rev().map(|i| format!("msg {i}")).collect();
    assert_eq!(bodies(&back), expected);
}

#[test]
fn backfill_is_served_by_topology_within_history_visibility() {
    let j = joined_after(6, "joined");
    // bob's server may not see what was sent before its user joined: served redacted.
    let app = j.b.hs.app().clone();
    let room: ruma::OwnedRoomId = j.room.as_str().try_into().unwrap();
    let r = j.room.clone();
    let ext = smol::block_on(
        app.store
            .read(move |c| hearth::store::history::list_backward_extremities(c, &r, 20)),
    )
    .unwrap();
    let dest: ruma::OwnedServerName = j.a.server_name().as_str().try_into().unwrap();
    let v: Vec<ruma::OwnedEventId> = ext.iter().map(|e| e.as_str().try_into().unwrap()).collect();
    let res = smol::block_on(app.fed.client.send(
        &dest,
        ruma::api::federation::backfill::get_backfill::v1::Request::new(
            room.clone(),
            v,
            50u32.into(),
        ),
    ))
    .expect("a serves /backfill");
    let pdus: Vec<Value> = res
        .pdus
        .iter()
        .map(|p| serde_json::from_str(p.get()).unwrap())
        .collect();
    let depths: Vec<u64> = pdus.iter().map(|p| p["depth"].as_u64().unwrap()).collect();
    let mut sorted = depths.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(depths, sorted, "newest first by depth");
    let msgs: Vec<&Value> = pdus
        .iter()
        .filter(|p| p["type"] == "m.room.message")
        .collect();
    assert_eq!(msgs.len(), 6);
    for m in msgs {
        assert_eq!(m["content"], json!({}), "served redacted: {m}");
    }
    assert!(pdus.iter().any(|p| p["type"] == "m.room.create"));

    // bob pages back: under `joined` visibility his history starts at his join, and the
    // pagination ends there.
    let back = page_all(
        &|q| messages(&j.b.url(), &j.bob, &j.room, q),
        "b",
        None,
        "&limit=10",
    );
    assert!(bodies(&back).is_empty(), "{back:?}");
    assert_eq!(back.last().unwrap()["type"], "m.room.member");
}

#[test]
fn a_messages_request_cut_off_during_backfill_leaves_it_to_complete() {
    let j = joined_after(30, "shared");
    let url = format!(
        "{}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=40",
        j.b.url(),
        enc(&j.room)
    );
    // The client hangs up almost at once: the request is dropped wherever it is, the backfill
    // it started (if it got that far) goes on in its own task.
    let out = std::process::Command::new("curl")
        .args(["-sk", "--max-time", "0.05", "-H"])
        .arg(format!("Authorization: Bearer {}", j.bob))
        .arg(&url)
        .output()
        .expect("curl runs");
    assert!(!out.status.success(), "the request was cut off");
    let back = page_all(
        &|q| messages(&j.b.url(), &j.bob, &j.room, q),
        "b",
        None,
        "&limit=7",
    );
    assert_unique(&back);
    let expected: Vec<String> = (0..30).rev().map(|i| format!("msg {i}")).collect();
    assert_eq!(bodies(&back), expected);
    assert_eq!(back.last().unwrap()["type"], "m.room.create");
}
