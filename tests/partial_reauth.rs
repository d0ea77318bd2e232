//! Partial-state joins, joiner side, between Hearths with the resident behind a test front
//! (`common::front`): the events received while the room was partial are re-authorised on
//! the full state once the resync completes, the resync falls back to another server of the
//! room when the resident fails, and a resync cut by a kill -9 resumes after the restart.

mod common;

use common::{
    fed::{curl, joined_members_within, register, Hearth, HearthProcess},
    front::Front,
    synapse::eventually,
};
use ruma::{
    api::federation::transactions::send_transaction_message, CanonicalJsonObject, OwnedServerName,
};
use serde_json::{json, Value};

const STATE_IDS: &str = "/_matrix/federation/v1/state_ids/";

/// A resident Hearth behind a front: the Hearth's server name is the front's address.
fn resident() -> (Front, Hearth) {
    let front = Front::start();
    let name = front.server_name();
    let a = Hearth::start_with("127.0.0.1", |c| c.server_name = name);
    front.forward_to(a.port);
    (front, a)
}

fn post(base: &str, path: &str, token: &str, body: Value) -> Value {
    let (s, v) = curl("POST", &format!("{base}{path}"), Some(token), Some(&body));
    assert_eq!(s, 200, "POST {path}: {v}");
    v
}

fn put(base: &str, path: &str, token: &str, body: Value) -> Value {
    let (s, v) = curl("PUT", &format!("{base}{path}"), Some(token), Some(&body));
    assert_eq!(s, 200, "PUT {path}: {v}");
    v
}

/// A room on the resident created by alice with this `createRoom` body, with `members` more
/// local users joined: (room, alice's token).
fn room_on(a: &Hearth, body: Value, members: usize) -> (String, String) {
    let (_, alice_tok) = register(&a.url(), "alice");
    let v = post(&a.url(), "/_matrix/client/v3/createRoom", &alice_tok, body);
    let room = v["room_id"].as_str().unwrap().to_owned();
    for i in 0..members {
        let (_, tok) = register(&a.url(), &format!("m{i}"));
        join(&a.url(), &tok, &room, &a.server_name());
    }
    (room, alice_tok)
}

/// `user` (at `base`) joins `room` through `via`.
fn join(base: &str, token: &str, room: &str, via: &str) {
    post(
        base,
        &format!(
            "/_matrix/client/v3/join/{}?server_name={}",
            common::enc(room),
            common::enc(via)
        ),
        token,
        json!({}),
    );
}

/// The room's topic as the server at `base` has it now.
fn topic(base: &str, token: &str, room: &str) -> Value {
    let (_, v) = curl(
        "GET",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/state/m.room.topic/",
            common::enc(room)
        ),
        Some(token),
        None,
    );
    v["topic"].clone()
}

/// A current state event's ID on an in-process Hearth.
fn state_id(h: &Hearth, room: &str, kind: &str, key: &str) -> String {
    let what = format!("{kind}/{key}");
    let (room, kind, key) = (room.to_owned(), kind.to_owned(), key.to_owned());
    smol::block_on(
        h.hs.app()
            .store
            .read(move |c| hearth::store::queries::get_current_state(c, &room, &kind, &key)),
    )
    .unwrap()
    .unwrap_or_else(|| panic!("no {what} in the current state"))
}

/// The joiner's forward extremities and the depth after them (the prev events and depth of
/// an event built on its view of the room).
fn tip(app: &hearth::App, room: &str) -> (Vec<String>, i64) {
    let room = room.to_owned();
    let ext = smol::block_on(
        app.store
            .read(move |c| hearth::store::queries::list_forward_extremities(c, &room)),
    )
    .unwrap();
    let depth = ext.iter().map(|(_, d)| *d).max().unwrap() + 1;
    (ext.into_iter().map(|(e, _)| e).collect(), depth)
}

/// A PDU with these fields, hashed and signed with `origin`'s key (room version 10): an event
/// its origin really sent, with the auth events the test chose.
fn signed(origin: &Hearth, fields: Value) -> (String, Box<serde_json::value::RawValue>) {
    let app = origin.hs.app();
    let mut fields = fields;
    fields["origin_server_ts"] = json!(app.clock.now_ms());
    let mut obj: CanonicalJsonObject = serde_json::from_value(fields).unwrap();
    let rules = ruma::RoomVersionId::V10.rules().unwrap();
    let id = common::fed::sign_as(app, &mut obj, &rules);
    (id, serde_json::value::to_raw_value(&obj).unwrap())
}

/// Sends `pdu` from `origin` to `dest` in a signed `/send` transaction: the answer for it
/// (`Ok` if accepted).
fn send_pdu(
    origin: &Hearth,
    dest: &str,
    id: &str,
    pdu: Box<serde_json::value::RawValue>,
) -> Result<(), String> {
    let app = origin.hs.app();
    let dest: OwnedServerName = dest.try_into().unwrap();
    let mut req = send_transaction_message::v1::Request::new(
        format!("t{}", app.clock.now_ms()).into(),
        app.server_name.clone(),
        ruma::MilliSecondsSinceUnixEpoch::now(),
    );
    req.pdus = vec![pdu];
    let res = smol::block_on(app.fed.client.send(&dest, req)).unwrap();
    res.pdus
        .into_iter()
        .find(|(k, _)| k.as_str() == id)
        .map(|(_, v)| v)
        .unwrap_or_else(|| Err("not answered".into()))
}

fn sync(base: &str, token: &str, since: Option<&str>) -> Value {
    let lazy = common::enc(r#"{"room":{"state":{"lazy_load_members":true}}}"#);
    let mut url = format!("{base}/_matrix/client/v3/sync?timeout=0&filter={lazy}");
    if let Some(s) = since {
        url.push_str(&format!("&since={s}"));
    }
    let (s, v) = curl("GET", &url, Some(token), None);
    assert_eq!(s, 200, "{v}");
    v
}

/// Whether events of the room wait in `partial_state_events` for re-authorisation.
fn recorded(app: &hearth::App, room: &str) -> bool {
    let room = room.to_owned();
    smol::block_on(
        app.store
            .read(move |c| hearth::store::reauth::has_partial_state_events(c, &room)),
    )
    .unwrap()
}

fn partial_rooms(app: &hearth::App) -> i64 {
    smol::block_on(
        app.store
            .read(|c| Ok(hearth::store::partial::list_partial_state_rooms(c)?.len() as i64)),
    )
    .unwrap()
}

#[test]
fn an_event_accepted_on_partial_state_is_rejected_after_the_resync_and_the_state_corrected() {
    let (front, a) = resident();
    let b = Hearth::start();
    let c = Hearth::start();
    // Anyone joined may set the topic, so only evil's ban keeps his topic out.
    let (room, alice_tok) = room_on(
        &a,
        json!({
            "preset": "public_chat", "name": "Reauth", "topic": "good",
            "power_level_content_override": { "events": { "m.room.topic": 0 } }
        }),
        0,
    );
    // c stays in the room through carol (so it learns of bob's join and serves b the events
    // b fetches from it); evil, also on c, is banned.
    let (evil, evil_tok) = register(&c.url(), "evil");
    let (_, carol_tok) = register(&c.url(), "carol");
    join(&c.url(), &evil_tok, &room, &a.server_name());
    join(&c.url(), &carol_tok, &room, &a.server_name());
    let evil_join = state_id(&a, &room, "m.room.member", &evil);
    // c's own resync done (its /state_ids must not be the one held below).
    assert!(joined_members_within(&c.url(), &evil_tok, &room, 60).is_some());
    post(
        &a.url(),
        &format!("/_matrix/client/v3/rooms/{}/ban", common::enc(&room)),
        &alice_tok,
        json!({ "user_id": evil }),
    );

    // b joins with partial state (evil is no hero: the room has a name) and stays partial.
    front.hold(STATE_IDS);
    let (_, bob_tok) = register(&b.url(), "bob");
    join(&b.url(), &bob_tok, &room, &a.server_name());
    front.wait_held(STATE_IDS, 30);
    assert_eq!(partial_rooms(b.hs.app()), 1);
    let first = sync(&b.url(), &bob_tok, None);
    let since = first["next_batch"].as_str().unwrap().to_owned();
    assert_eq!(topic(&b.url(), &bob_tok, &room), "good");

    // evil's topic, signed by c, citing his old join: b cannot know of the ban yet.
    let (prevs, depth) = tip(b.hs.app(), &room);
    let (id, pdu) = signed(
        &c,
        json!({
            "room_id": room, "sender": evil, "type": "m.room.topic", "state_key": "",
            "content": { "topic": "evil" }, "prev_events": prevs, "depth": depth,
            "auth_events": [
                state_id(&a, &room, "m.room.create", ""),
                state_id(&a, &room, "m.room.power_levels", ""),
                evil_join,
            ],
        }),
    );
    assert_eq!(send_pdu(&c, &b.server_name(), &id, pdu), Ok(()));
    assert!(recorded(b.hs.app(), &room), "recorded for re-authorisation");
    assert_eq!(topic(&b.url(), &bob_tok, &room), "evil");
    let seen = sync(&b.url(), &bob_tok, Some(&since));
    let timeline = &seen["rooms"]["join"][&room]["timeline"]["events"];
    assert!(
        timeline
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event_id"] == id.as_str()),
        "bob sees evil's topic while partial: {seen}"
    );
    let since = seen["next_batch"].as_str().unwrap().to_owned();
    // a never accepted it (it was not even sent there), and keeps its topic.
    assert_eq!(topic(&a.url(), &alice_tok, &room), "good");

    // The resync completes: evil's topic is rejected, and bob sees the topic go back.
    front.pass(STATE_IDS);
    let state = eventually(60, "bob's /sync corrects the topic", || {
        let v = sync(&b.url(), &bob_tok, Some(&since));
        let r = &v["rooms"]["join"][&room];
        r["state"]["events"]
            .as_array()
            .and_then(|s| s.iter().find(|e| e["type"] == "m.room.topic").cloned())
            .or_else(|| {
                r["timeline"]["events"]
                    .as_array()
                    .and_then(|s| s.iter().find(|e| e["type"] == "m.room.topic").cloned())
            })
    });
    assert_eq!(state["content"]["topic"], "good", "{state}");
    assert_eq!(topic(&b.url(), &bob_tok, &room), "good");
    assert!(
        !recorded(b.hs.app(), &room),
        "every recorded event re-authorised"
    );
    let (s, all) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/state",
            b.url(),
            common::enc(&room)
        ),
        Some(&bob_tok),
        None,
    );
    assert_eq!(s, 200, "{all}");
    let topics: Vec<&Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.topic")
        .collect();
    assert_eq!(topics.len(), 1);
    assert_eq!(topics[0]["content"]["topic"], "good");
    // The full member list, evil's ban included.
    let ban = all
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == evil.as_str())
        .expect("evil's membership after the resync");
    assert_eq!(ban["content"]["membership"], "ban");
    // A rejected event is no prev event of ours (spec, "Rejection"): evil's topic, b's only
    // forward extremity while partial, gave its place back to the events before it.
    let (tips, _) = tip(b.hs.app(), &room);
    assert!(
        !tips.is_empty() && !tips.contains(&id),
        "evil's topic is no longer a forward extremity: {tips:?}"
    );
    let mine = put(
        &b.url(),
        &format!(
            "/_matrix/client/v3/rooms/{}/send/m.room.message/after",
            common::enc(&room)
        ),
        &bob_tok,
        json!({ "msgtype": "m.text", "body": "after the resync" }),
    )["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let app = b.hs.app().clone();
    let pdu = smol::block_on(
        app.store
            .read(move |c| hearth::store::queries::get_event(c, &mine)),
    )
    .unwrap()
    .unwrap();
    let pdu: Value = serde_json::from_str(&pdu.json).unwrap();
    let mut cited: Vec<String> = serde_json::from_value(pdu["prev_events"].clone()).unwrap();
    let mut before = prevs.clone();
    cited.sort();
    before.sort();
    assert_eq!(
        cited, before,
        "bob's message follows what evil's topic followed: {pdu}"
    );
    // Evil's event left the timeline.
    let (_, msgs) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50",
            b.url(),
            common::enc(&room)
        ),
        Some(&bob_tok),
        None,
    );
    assert!(
        !msgs["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event_id"] == id.as_str()),
        "{msgs}"
    );
}

#[test]
fn an_event_rejected_on_partial_state_is_accepted_after_the_resync() {
    let (front, a) = resident();
    let b = Hearth::start();
    let c = Hearth::start();
    let (room, alice_tok) = room_on(&a, json!({ "preset": "public_chat", "name": "Reauth" }), 0);
    let public_rules = state_id(&a, &room, "m.room.join_rules", "");
    // c is in the room (so it holds its events, and can serve them to b).
    let (carol, carol_tok) = register(&c.url(), "carol");
    join(&c.url(), &carol_tok, &room, &a.server_name());
    assert!(joined_members_within(&c.url(), &carol_tok, &room, 60).is_some());
    // The room becomes invite-only; yves (on c) and bob (on b) are invited.
    put(
        &a.url(),
        &format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.join_rules/",
            common::enc(&room)
        ),
        &alice_tok,
        json!({ "join_rule": "invite" }),
    );
    let (yves, _) = register(&c.url(), "yves");
    let (bob, bob_tok) = register(&b.url(), "bob");
    for u in [&yves, &bob] {
        post(
            &a.url(),
            &format!("/_matrix/client/v3/rooms/{}/invite", common::enc(&room)),
            &alice_tok,
            json!({ "user_id": u }),
        );
    }
    front.hold(STATE_IDS);
    join(&b.url(), &bob_tok, &room, &a.server_name());
    front.wait_held(STATE_IDS, 30);

    // yves's join, citing the room's old public join rules instead of his invite: it passes
    // its own auth events; on b's partial state (invite-only, yves's invite unknown: he is no
    // hero of a named room, and bob's join does not cite him) it is rejected; on the full
    // state (yves invited) a join to an invite-only room is allowed.
    let (prevs, depth) = tip(b.hs.app(), &room);
    let (id, pdu) = signed(
        &c,
        json!({
            "room_id": room, "sender": yves, "type": "m.room.member", "state_key": yves,
            "content": { "membership": "join" }, "prev_events": prevs, "depth": depth,
            "auth_events": [
                state_id(&a, &room, "m.room.create", ""),
                state_id(&a, &room, "m.room.power_levels", ""),
                public_rules,
            ],
        }),
    );
    let answer = send_pdu(&c, &b.server_name(), &id, pdu);
    assert!(answer.is_err(), "rejected on partial state: {answer:?}");

    front.pass(STATE_IDS);
    let members = eventually(60, "yves's join is accepted after the resync", || {
        joined_members_within(&b.url(), &bob_tok, &room, 5).filter(|m| m.contains(&yves))
    });
    assert!(
        members.contains(&bob) && members.contains(&carol),
        "{members:?}"
    );
    let (s, ev) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/event/{}",
            b.url(),
            common::enc(&room),
            common::enc(&id)
        ),
        Some(&bob_tok),
        None,
    );
    assert_eq!(
        (s, &ev["content"]["membership"]),
        (200, &json!("join")),
        "{ev}"
    );
}

#[test]
fn when_the_resident_fails_the_resync_completes_from_another_server_of_the_room() {
    let (front, a) = resident();
    let d = Hearth::start();
    let b = Hearth::start();
    let (room, alice_tok) = room_on(
        &a,
        json!({ "preset": "public_chat", "name": "Fallback" }),
        3,
    );
    // d joins and completes its own resync: it can answer /state_ids for the room.
    let (_, dave_tok) = register(&d.url(), "dave");
    join(&d.url(), &dave_tok, &room, &a.server_name());
    assert!(joined_members_within(&d.url(), &dave_tok, &room, 60).is_some());

    front.fail(STATE_IDS);
    let (bob, bob_tok) = register(&b.url(), "bob");
    join(&b.url(), &bob_tok, &room, &a.server_name());
    let members = eventually(60, "b completes the room from d", || {
        joined_members_within(&b.url(), &bob_tok, &room, 5)
    });
    assert!(front.seen(STATE_IDS) >= 1, "b asked the resident first");
    assert!(members.contains(&bob), "{members:?}");
    let on_a = eventually(30, "a has bob's join", || {
        joined_members_within(&a.url(), &alice_tok, &room, 5).filter(|m| m.contains(&bob))
    });
    assert_eq!(members, on_a);
    assert_eq!(partial_rooms(b.hs.app()), 0);
}

#[test]
fn a_resync_cut_by_a_kill_resumes_after_the_restart() {
    let (front, a) = resident();
    let mut b = HearthProcess::start();
    let (room, alice_tok) = room_on(&a, json!({ "preset": "public_chat", "name": "Restart" }), 4);
    front.hold(STATE_IDS);
    let (bob, bob_tok) = register(&b.url(), "bob");
    join(&b.url(), &bob_tok, &room, &a.server_name());
    front.wait_held(STATE_IDS, 30);
    b.kill9();
    let still: i64 = b
        .db()
        .query_row("SELECT COUNT(*) FROM partial_state_rooms", [], |r| r.get(0))
        .unwrap();
    assert_eq!(still, 1, "killed while partial");
    let asked = front.seen(STATE_IDS);
    b.restart();
    // The restarted resync asks again (and is held again) before the front lets go.
    eventually(30, "the restarted b asks /state_ids again", || {
        (front.seen(STATE_IDS) > asked).then_some(())
    });
    assert_eq!(joined_members_within(&b.url(), &bob_tok, &room, 2), None);
    front.pass(STATE_IDS);
    let members = eventually(60, "b completes the room after its restart", || {
        joined_members_within(&b.url(), &bob_tok, &room, 5)
    });
    assert!(members.contains(&bob), "{members:?}");
    assert_eq!(members.len(), 6, "{members:?}");
    assert_eq!(
        Some(members),
        joined_members_within(&a.url(), &alice_tok, &room, 5)
    );
}
