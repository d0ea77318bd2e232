//! Partial-state joins (MSC3706, MSC3943) between Hearths: the shape of the resident's
//! `/send_join` answer when the joining server asks with `omit_members=true`.

mod common;

use std::collections::{BTreeSet, HashSet};

use common::fed::{curl, register, Hearth};
use ruma::{
    api::federation::membership::{create_join_event, prepare_join_event},
    OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomVersionId,
};
use serde_json::{json, Value};

/// A `/send_join` answer, parsed.
struct Answer {
    state: Vec<Value>,
    chain: Vec<Value>,
    omitted: bool,
    servers: Vec<String>,
    join: OwnedEventId,
    version: RoomVersionId,
}

/// `/make_join` then `/send_join` v2 from `b` (for its user `user`) to `a`, signed with `b`'s
/// key as a joining server would: the answer's state, auth chain (as JSON), flag and servers.
fn join_through(b: &Hearth, a: &Hearth, room: &str, user: &str, omit_members: bool) -> Answer {
    let app = b.hs.app();
    let dest: OwnedServerName = a.server_name().try_into().unwrap();
    let room: OwnedRoomId = room.try_into().unwrap();
    let user: OwnedUserId = user.try_into().unwrap();
    let mut mj = prepare_join_event::v1::Request::new(room.clone(), user);
    mj.ver = vec![RoomVersionId::V10, RoomVersionId::V11];
    let res = smol::block_on(app.fed.client.send(&dest, mj)).unwrap();
    let version = res.room_version.unwrap();
    let rules = version.rules().unwrap();
    let mut obj: ruma::CanonicalJsonObject = serde_json::from_str(res.event.get()).unwrap();
    obj.insert("origin".into(), app.server_name.as_str().into());
    obj.insert(
        "origin_server_ts".into(),
        ruma::CanonicalJsonValue::Integer(ruma::Int::try_from(app.clock.now_ms() as i64).unwrap()),
    );
    let id: OwnedEventId = common::fed::sign_as(app, &mut obj, &rules)
        .try_into()
        .unwrap();
    let mut sj = create_join_event::v2::Request::new(
        room,
        id.clone(),
        serde_json::value::to_raw_value(&obj).unwrap(),
    );
    sj.omit_members = omit_members;
    let s = smol::block_on(app.fed.client.send(&dest, sj))
        .unwrap()
        .room_state;
    let parse = |v: &[Box<serde_json::value::RawValue>]| -> Vec<Value> {
        v.iter()
            .map(|r| serde_json::from_str(r.get()).unwrap())
            .collect()
    };
    Answer {
        state: parse(&s.state),
        chain: parse(&s.auth_chain),
        omitted: s.members_omitted,
        servers: s.servers_in_room.unwrap_or_default(),
        join: id,
        version,
    }
}

fn member_keys(state: &[Value]) -> BTreeSet<String> {
    state
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap().to_owned())
        .collect()
}

fn types(state: &[Value]) -> BTreeSet<String> {
    state
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect()
}

/// Every auth event of the state, of the auth chain and of the join is in one of the two,
/// and nothing is in both (the auth chain is deduplicated against the state).
fn assert_closed_and_deduplicated(
    state: &[Value],
    chain: &[Value],
    join_auth: &[String],
    version: &RoomVersionId,
) {
    let id_of = |e: &Value| -> String {
        // Room versions 3+ have no `event_id` field: the reference hash is the ID.
        let obj: ruma::CanonicalJsonObject = serde_json::from_value(e.clone()).unwrap();
        let rules = version.rules().unwrap();
        format!(
            "${}",
            ruma::signatures::reference_hash(&obj, &rules).unwrap()
        )
    };
    let s: HashSet<String> = state.iter().map(id_of).collect();
    let c: HashSet<String> = chain.iter().map(id_of).collect();
    assert!(s.is_disjoint(&c), "the auth chain repeats state events");
    let all: HashSet<&String> = s.iter().chain(c.iter()).collect();
    for e in state.iter().chain(chain.iter()) {
        for a in e["auth_events"].as_array().unwrap() {
            assert!(all.contains(&a.as_str().unwrap().to_owned()), "missing {a}");
        }
    }
    for a in join_auth {
        assert!(all.contains(a), "the join's auth event {a} is missing");
    }
}

fn join_auth_events(a: &Hearth, id: &OwnedEventId) -> Vec<String> {
    let id = id.to_string();
    let row = smol::block_on(
        a.hs.app()
            .store
            .read(move |c| hearth::store::queries::get_event(c, &id)),
    )
    .unwrap()
    .expect("the join is stored on the resident");
    let v: Value = serde_json::from_str(&row.json).unwrap();
    v["auth_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_owned())
        .collect()
}

/// A room on `a` created by alice with `extra` in `createRoom`, `n` more local users joined.
fn room_with_members(a: &Hearth, extra: Value, n: usize) -> (String, String, Vec<String>) {
    let (alice, alice_tok) = register(&a.url(), "alice");
    let mut body = json!({ "preset": "public_chat" });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", a.url()),
        Some(&alice_tok),
        Some(&body),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let mut users = vec![alice];
    for i in 0..n {
        let (u, tok) = register(&a.url(), &format!("member{i:02}"));
        let (s, v) = curl(
            "POST",
            &format!("{}/_matrix/client/v3/join/{}", a.url(), common::enc(&room)),
            Some(&tok),
            Some(&json!({})),
        );
        assert_eq!(s, 200, "{v}");
        users.push(u);
    }
    (room, alice_tok, users)
}

/// The line of metric `name` in `/_hearth/metrics` of the server at `base`.
fn metric(base: &str, name: &str) -> String {
    let out = common::fed::curl_command("GET", None)
        .arg(format!("{base}/_hearth/metrics"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_default()
        .to_owned()
}

const STATE_IDS: &str = "/_matrix/federation/v1/state_ids/";

fn partial_joins_served(a: &Hearth) -> String {
    metric(&a.url(), "hearth_federation_partial_send_joins_total")
}

#[test]
fn a_named_room_is_answered_without_members_and_a_deduplicated_auth_chain() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (room, _, users) = room_with_members(&a, json!({ "name": "Named" }), 8);
    let bob = format!("@bob:{}", b.server_name());
    let carol = format!("@carol:{}", b.server_name());

    let r = join_through(&b, &a, &room, &bob, true);
    let (state, chain) = (&r.state, &r.chain);
    assert!(r.omitted, "members_omitted");
    assert_eq!(r.servers, vec![a.server_name()], "servers before the join");
    assert!(member_keys(state).is_empty(), "{:?}", member_keys(state));
    for t in [
        "m.room.create",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.name",
    ] {
        assert!(types(state).contains(t), "{t} in the partial state");
    }
    // Members' events come only as far as the state's auth needs them: the creator's join,
    // which authorised the room's first events, in the auth chain.
    assert_eq!(member_keys(chain), BTreeSet::from([users[0].clone()]));
    assert_closed_and_deduplicated(state, chain, &join_auth_events(&a, &r.join), &r.version);
    assert_eq!(
        partial_joins_served(&a),
        "hearth_federation_partial_send_joins_total 1"
    );

    // Asked without omit_members, the same room is answered in full: every member, bob too
    // now (he joined before carol).
    let full = join_through(&b, &a, &room, &carol, false);
    assert!(!full.omitted);
    let mut all: BTreeSet<String> = users.iter().cloned().collect();
    all.insert(bob.clone());
    assert_eq!(member_keys(&full.state), all);
    assert_eq!(
        partial_joins_served(&a),
        "hearth_federation_partial_send_joins_total 1"
    );
}

#[test]
fn a_nameless_room_carries_its_heroes_and_the_joiners_own_invite() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (room, alice_tok, users) = room_with_members(&a, json!({}), 7);
    let (bob, _) = register(&b.url(), "bob");
    // Bob was invited: his invite (the join's auth event) comes with the partial state.
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/invite",
            a.url(),
            common::enc(&room)
        ),
        Some(&alice_tok),
        Some(&json!({ "user_id": bob })),
    );
    assert_eq!(s, 200, "{v}");

    let r = join_through(&b, &a, &room, &bob, true);
    let state = &r.state;
    assert!(r.omitted);
    // The heroes as /sync's summary names them: the first five other joined or invited
    // members by user ID, and bob's own previous membership (his invite).
    let mut heroes: Vec<String> = users.clone();
    heroes.sort();
    heroes.truncate(5);
    let mut expect: BTreeSet<String> = heroes.into_iter().collect();
    expect.insert(bob.clone());
    assert_eq!(member_keys(state), expect);
    let invite = state
        .iter()
        .find(|e| e["state_key"] == bob.as_str())
        .unwrap();
    assert_eq!(invite["content"]["membership"], "invite");
    assert_closed_and_deduplicated(state, &r.chain, &join_auth_events(&a, &r.join), &r.version);
}

#[test]
fn while_partial_the_room_is_usable_joins_through_it_are_refused_and_members_wait() {
    use common::fed::HearthProcess;
    // The resident `a` behind a front that holds `/state_ids` (so the room stays partial on
    // the joiner `b` for as long as the test needs); `c` only asks `b` to join through it.
    let front = common::front::Front::start();
    let name = front.server_name();
    let a = Hearth::start_with("127.0.0.1", |c| c.server_name = name);
    front.forward_to(a.port);
    let b = HearthProcess::start();
    let c = Hearth::start();
    let (_, alice_tok) = register(&a.url(), "alice");
    let members: Vec<String> = (0..5)
        .map(|i| register(&a.url(), &format!("m{i}")).1)
        .collect();
    let (bob, bob_tok) = register(&b.url(), "bob");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", a.url()),
        Some(&alice_tok),
        Some(&json!({ "preset": "public_chat", "name": "Resident" })),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let join_path = format!("/_matrix/client/v3/join/{}", common::enc(&room));
    for tok in &members {
        let (s, v) = curl(
            "POST",
            &format!("{}{join_path}", a.url()),
            Some(tok),
            Some(&json!({})),
        );
        assert_eq!(s, 200, "{v}");
    }
    front.hold(STATE_IDS);
    let (s, v) = curl(
        "POST",
        &format!(
            "{}{join_path}?server_name={}",
            b.url(),
            common::enc(&a.server_name())
        ),
        Some(&bob_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    front.wait_held(STATE_IDS, 30);

    // Usable at once: bob sends, and a second local user joins.
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/w1",
            b.url(),
            common::enc(&room)
        ),
        Some(&bob_tok),
        Some(&json!({ "msgtype": "m.text", "body": "while partial" })),
    );
    assert_eq!(s, 200, "{v}");
    let (eve, eve_tok) = register(&b.url(), "eve");
    let (s, v) = curl(
        "POST",
        &format!("{}{join_path}", b.url()),
        Some(&eve_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    // The member list waits for the resync (the client gives up; nothing is answered).
    assert_eq!(
        common::fed::joined_members_within(&b.url(), &bob_tok, &room, 2),
        None
    );
    assert_eq!(
        metric(&b.url(), "hearth_partial_state_rooms"),
        "hearth_partial_state_rooms 1"
    );
    // MSC3895: b refuses to be joined through while partial, as Synapse does.
    let capp = c.hs.app();
    let dest: OwnedServerName = b.server_name().try_into().unwrap();
    let mj = prepare_join_event::v1::Request::new(
        room.as_str().try_into().unwrap(),
        format!("@carol:{}", c.server_name()).try_into().unwrap(),
    );
    let err = smol::block_on(capp.fed.client.send(&dest, mj)).unwrap_err();
    assert_eq!(
        (err.status, err.errcode),
        (404, "M_NOT_FOUND"),
        "{}",
        err.message
    );

    // /sync: without lazy-loading members the room is left out (its member list would be
    // wrong); lazy-loading shows it at once.
    let sync = |query: &str| -> Value {
        let (s, v) = curl(
            "GET",
            &format!("{}/_matrix/client/v3/sync?{query}", b.url()),
            Some(&bob_tok),
            None,
        );
        assert_eq!(s, 200, "{v}");
        v
    };
    let plain = sync("timeout=0");
    assert!(plain["rooms"]["join"].get(&room).is_none(), "{plain}");
    let mut since = plain["next_batch"].as_str().unwrap().to_owned();
    let lazy = common::enc(r#"{"room":{"state":{"lazy_load_members":true}}}"#);
    let v = sync(&format!("timeout=0&filter={lazy}"));
    assert!(v["rooms"]["join"].get(&room).is_some(), "{v}");
    // Leaving works while partial (eve; bob stays).
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/leave",
            b.url(),
            common::enc(&room)
        ),
        Some(&eve_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");

    // The front lets the resync through: it completes and b lists every member.
    front.pass(STATE_IDS);
    let members = common::synapse::eventually(90, "b's member list is complete", || {
        common::fed::joined_members_within(&b.url(), &bob_tok, &room, 5).filter(|m| m.len() == 7)
    });
    assert!(
        members.contains(&bob) && !members.contains(&eve),
        "{members:?}"
    );
    // The non-lazy /sync now sends the room whole, as newly joined.
    let state = common::synapse::eventually(30, "the room reaches the non-lazy /sync", || {
        let v = sync(&format!("since={since}&timeout=5000"));
        since = v["next_batch"].as_str().unwrap().to_owned();
        v["rooms"]["join"]
            .get(&room)
            .map(|r| r["state"]["events"].clone())
    });
    let types: BTreeSet<&str> = state
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(
        types.contains("m.room.create") && types.contains("m.room.name"),
        "{state}"
    );
    common::synapse::eventually(10, "the gauge follows", || {
        (metric(&b.url(), "hearth_partial_state_rooms") == "hearth_partial_state_rooms 0")
            .then_some(())
    });
    assert_eq!(
        metric(&b.url(), "hearth_resync_events_left"),
        "hearth_resync_events_left 0"
    );
    let on_a = common::fed::joined_members_within(&a.url(), &alice_tok, &room, 5).unwrap();
    assert_eq!(members, on_a);
    assert_eq!(
        common::synapse::eventually(30, "a gets bob's message", || {
            let bodies = common::synapse::room_bodies(&a.url(), &alice_tok, &room, 50);
            bodies
                .contains(&"while partial".to_owned())
                .then_some(bodies)
        })
        .len(),
        1
    );
}

#[test]
fn with_partial_joins_off_a_join_downloads_the_full_state() {
    let a = Hearth::start();
    let b = Hearth::start_with("127.0.0.1", |c| c.federation.partial_joins = false);
    let (room, alice_tok, users) = room_with_members(&a, json!({ "name": "Full" }), 4);
    let (bob, bob_tok) = register(&b.url(), "bob");
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            b.url(),
            common::enc(&room),
            common::enc(&a.server_name())
        ),
        Some(&bob_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    // Asked without omit_members: answered in full, and b knows every member at once.
    assert_eq!(
        partial_joins_served(&a),
        "hearth_federation_partial_send_joins_total 0"
    );
    assert_eq!(
        metric(&b.url(), "hearth_federation_partial_joins_total"),
        "hearth_federation_partial_joins_total 0"
    );
    let mut expect: Vec<String> = users.clone();
    expect.push(bob);
    expect.sort();
    assert_eq!(
        common::fed::joined_members_within(&b.url(), &bob_tok, &room, 5),
        Some(expect.clone())
    );
    assert_eq!(
        common::fed::joined_members_within(&a.url(), &alice_tok, &room, 5),
        Some(expect)
    );
}

#[test]
fn a_resident_with_serve_partial_joins_off_answers_omit_members_in_full() {
    let a = Hearth::start_with("127.0.0.1", |c| c.federation.serve_partial_joins = false);
    let b = Hearth::start();
    let (room, _, users) = room_with_members(&a, json!({ "name": "Full answers" }), 3);
    let bob = format!("@bob:{}", b.server_name());
    // Asked with omit_members (as Synapse always asks): every member, and no flag.
    let r = join_through(&b, &a, &room, &bob, true);
    assert!(!r.omitted, "members_omitted");
    assert_eq!(
        member_keys(&r.state),
        users.iter().cloned().collect::<BTreeSet<String>>()
    );
    assert_eq!(
        partial_joins_served(&a),
        "hearth_federation_partial_send_joins_total 0"
    );
}
