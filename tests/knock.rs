//! Knocking (room versions 7+, join rule `knock`): locally (knock, rescind with a leave,
//! refusal with a kick, acceptance with an invite then a join), the `knock` section of
//! `/sync`, the resident's `/make_knock` and `/send_knock` refused while it is only partially
//! joined (MSC3895), and knocks across federation with a real Synapse 1.163 both ways.

mod common;

use common::{
    enc,
    fed::{curl, register, Hearth},
    synapse::{eventually, PerFile, Synapse},
    TestServer,
};
use ruma::{
    api::federation::membership::{create_knock_event, prepare_knock_event},
    OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomVersionId,
};
use serde_json::{json, Value};

static SYNAPSE: PerFile = PerFile::new(TESTS, || {
    std::env::var("HEARTH_TEST_SYNAPSE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .map_or_else(Synapse::start, Synapse::shared)
});

/// Tests in this file that take a turn with the Synapse: bump it when adding one.
const TESTS: usize = 2;

/// A `/createRoom` body for a version 10 room whose join rule is `knock`.
fn knock_room_body(name: &str) -> Value {
    json!({
        "preset": "private_chat",
        "name": name,
        "room_version": "10",
        "initial_state": [{ "type": "m.room.join_rules", "state_key": "", "content": { "join_rule": "knock" } }],
    })
}

/// The membership of `user` in `room` as `token`'s user reads the room state at `base`.
fn membership(base: &str, token: &str, room: &str, user: &str) -> Option<String> {
    let (s, v) = curl(
        "GET",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
            enc(room),
            enc(user)
        ),
        Some(token),
        None,
    );
    (s == 200)
        .then(|| v["membership"].as_str().map(str::to_owned))
        .flatten()
}

/// The `knock_state` events of `room` in a sync response, if the room is in its `knock`
/// section.
fn knock_state(sync: &Value, room: &str) -> Option<Vec<Value>> {
    sync["rooms"]["knock"][room]["knock_state"]["events"]
        .as_array()
        .cloned()
}

fn has_join_rule_knock(events: &[Value]) -> bool {
    events
        .iter()
        .any(|e| e["type"] == "m.room.join_rules" && e["content"]["join_rule"] == "knock")
}

#[test]
fn local_knock_is_rescinded_refused_and_accepted() {
    let s = TestServer::start();
    let (_alice, a) = s.register("alice");
    let (bob, b) = s.register("bob");
    let room = s.create_room(&a, knock_room_body("Knock here"));
    let knock_path = format!("/_matrix/client/v3/knock/{}", enc(&room));
    let leave_path = format!("/_matrix/client/v3/rooms/{}/leave", enc(&room));
    let member = format!(
        "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
        enc(&room),
        enc(&bob)
    );
    let bob_membership = || s.ok("GET", &member, Some(&a), None)["membership"].clone();

    // A room that is not knockable refuses: the join rule of a public room is `public`.
    let public = s.create_room(&a, json!({ "preset": "public_chat", "room_version": "10" }));
    s.err(
        "POST",
        &format!("/_matrix/client/v3/knock/{}", enc(&public)),
        Some(&b),
        Some(&json!({})),
        403,
        "M_FORBIDDEN",
    );

    // Knock with a reason: bob's sync lists the room under `knock` with its stripped state
    // and his knock; alice sees it in the room.
    let v = s.ok(
        "POST",
        &knock_path,
        Some(&b),
        Some(&json!({ "reason": "let me in" })),
    );
    assert_eq!(v["room_id"], room.as_str());
    assert_eq!(bob_membership(), "knock");
    let sync = s.sync(&b, "timeout=0");
    let events = knock_state(&sync, &room).unwrap_or_else(|| panic!("{sync}"));
    assert!(has_join_rule_knock(&events), "{sync}");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Knock here"),
        "{sync}"
    );
    let own = events
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str())
        .unwrap_or_else(|| panic!("{sync}"));
    assert_eq!(own["content"]["membership"], "knock");
    assert_eq!(own["content"]["reason"], "let me in");
    let since = sync["next_batch"].as_str().unwrap().to_owned();

    // Rescinded with a leave: the room leaves the knock section.
    s.ok("POST", &leave_path, Some(&b), Some(&json!({})));
    assert_eq!(bob_membership(), "leave");
    let sync = s.sync(&b, &format!("since={since}&timeout=0"));
    assert!(knock_state(&sync, &room).is_none(), "{sync}");
    assert!(knock_state(&s.sync(&b, "timeout=0"), &room).is_none());

    // Refused with a kick (alice may kick: power 100).
    s.ok("POST", &knock_path, Some(&b), Some(&json!({})));
    assert_eq!(bob_membership(), "knock");
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)),
        Some(&a),
        Some(&json!({ "user_id": bob, "reason": "not now" })),
    );
    assert_eq!(bob_membership(), "leave");
    // A knocker cannot let themselves in.
    s.ok("POST", &knock_path, Some(&b), Some(&json!({})));
    s.err(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/join", enc(&room)),
        Some(&b),
        Some(&json!({})),
        403,
        "M_FORBIDDEN",
    );

    // Accepted with an invite; bob joins.
    s.ok(
        "POST",
        &format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)),
        Some(&a),
        Some(&json!({ "user_id": bob })),
    );
    assert_eq!(bob_membership(), "invite");
    let sync = s.sync(&b, "timeout=0");
    assert!(sync["rooms"]["invite"].get(&room).is_some(), "{sync}");
    assert!(knock_state(&sync, &room).is_none(), "{sync}");
    s.join(&b, &room);
    assert_eq!(bob_membership(), "join");
}

/// `/make_knock` from `b` to `a` for `user`: the template signed by `b` as a knocking server
/// would, with its event ID.
fn signed_knock(b: &Hearth, a: &Hearth, room: &str, user: &str) -> (OwnedEventId, Value) {
    let app = b.hs.app();
    let dest: OwnedServerName = a.server_name().try_into().unwrap();
    let mut mk = prepare_knock_event::v1::Request::new(
        room.try_into().unwrap(),
        OwnedUserId::try_from(user).unwrap(),
    );
    mk.ver = vec![RoomVersionId::V10];
    let res = smol::block_on(app.fed.client.send(&dest, mk)).unwrap();
    let rules = res.room_version.rules().unwrap();
    let mut obj: ruma::CanonicalJsonObject = serde_json::from_str(res.event.get()).unwrap();
    obj.insert("origin".into(), app.server_name.as_str().into());
    ruma::signatures::hash_and_sign_event(
        app.server_name.as_str(),
        &app.local.key.pair,
        &mut obj,
        &rules.redaction,
    )
    .unwrap();
    let id = format!(
        "${}",
        ruma::signatures::reference_hash(&obj, &rules).unwrap()
    )
    .try_into()
    .unwrap();
    (id, serde_json::to_value(obj).unwrap())
}

#[test]
fn a_partially_joined_resident_refuses_knocks_until_fully_joined() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (_, alice_tok) = register(&a.url(), "alice");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", a.url()),
        Some(&alice_tok),
        Some(&knock_room_body("Partial")),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let bob = format!("@bob:{}", b.server_name());
    let (knock_id, knock) = signed_knock(&b, &a, &room, &bob);

    // `a` is made partial-state for the room (as after a partial join): both halves of a
    // knock through it are refused with its make_join refusal, 404 `M_NOT_FOUND`.
    let set_partial = |on: bool| {
        let r = room.clone();
        smol::block_on(a.hs.app().store.write(move |tx| {
            use hearth::store::partial as p;
            if on {
                let room = p::PartialRoom {
                    room_id: r.clone(),
                    join_event_id: "$unknown".into(),
                    joined_via: "127.0.0.1:1".into(),
                };
                p::insert_partial_state_room(tx, &room, 0, &[])
            } else {
                p::delete_partial_state_room(tx, &r)
            }
        }))
        .unwrap();
    };
    set_partial(true);
    let dest: OwnedServerName = a.server_name().try_into().unwrap();
    let bapp = b.hs.app();
    let room_id: OwnedRoomId = room.as_str().try_into().unwrap();
    let mut mk =
        prepare_knock_event::v1::Request::new(room_id.clone(), bob.as_str().try_into().unwrap());
    mk.ver = vec![RoomVersionId::V10];
    let err = smol::block_on(bapp.fed.client.send(&dest, mk.clone())).unwrap_err();
    assert_eq!(
        (err.status, err.errcode),
        (404, "M_NOT_FOUND"),
        "{}",
        err.message
    );
    let send = || {
        let raw = serde_json::value::to_raw_value(&knock).unwrap();
        let sk = create_knock_event::v1::Request::new(room_id.clone(), knock_id.clone(), raw);
        smol::block_on(bapp.fed.client.send(&dest, sk))
    };
    let err = send().unwrap_err();
    assert_eq!(
        (err.status, err.errcode),
        (404, "M_NOT_FOUND"),
        "{}",
        err.message
    );
    assert_eq!(membership(&a.url(), &alice_tok, &room, &bob), None);

    // Fully joined again: the same knock is accepted and answered with the stripped state.
    set_partial(false);
    smol::block_on(bapp.fed.client.send(&dest, mk)).expect("make_knock once fully joined");
    let res = send().expect("send_knock once fully joined");
    let state: Vec<Value> = res
        .knock_room_state
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    assert!(has_join_rule_knock(&state), "{state:?}");
    assert_eq!(
        membership(&a.url(), &alice_tok, &room, &bob).as_deref(),
        Some("knock")
    );
}

/// `token`'s user's initial sync at `base`.
fn sync(base: &str, token: &str) -> Value {
    let (s, v) = curl(
        "GET",
        &format!("{base}/_matrix/client/v3/sync?timeout=0"),
        Some(token),
        None,
    );
    assert_eq!(s, 200, "{v}");
    v
}

#[test]
fn a_hearth_user_knocks_on_a_synapse_room_and_is_let_in() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (alice, alice_tok) = register(&hearth.url(), "alice");
    let (_, carol_tok) = register(&syn.url(), "carol_knocked");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", syn.url()),
        Some(&carol_tok),
        Some(&knock_room_body("Synapse knock room")),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let knock = || {
        curl(
            "POST",
            &format!(
                "{}/_matrix/client/v3/knock/{}?via={}",
                hearth.url(),
                enc(&room),
                enc(&syn.server_name())
            ),
            Some(&alice_tok),
            Some(&json!({ "reason": "from Hearth" })),
        )
    };

    // Knock through Synapse: alice's sync shows what Synapse answered, carol sees the knock.
    let (s, v) = knock();
    assert_eq!(s, 200, "{v}");
    let events = knock_state(&sync(&hearth.url(), &alice_tok), &room).expect("knock section");
    assert!(has_join_rule_knock(&events), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e["content"]["name"] == "Synapse knock room"),
        "{events:?}"
    );
    let on_synapse = |want: &str| {
        eventually(30, &format!("Synapse sees alice's {want}"), || {
            (membership(&syn.url(), &carol_tok, &room, &alice).as_deref() == Some(want))
                .then_some(())
        })
    };
    on_synapse("knock");

    // Rescinded (a leave through Synapse), then knocked again.
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/leave",
            hearth.url(),
            enc(&room)
        ),
        Some(&alice_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    on_synapse("leave");
    assert!(knock_state(&sync(&hearth.url(), &alice_tok), &room).is_none());
    let (s, v) = knock();
    assert_eq!(s, 200, "{v}");
    on_synapse("knock");

    // Carol accepts with an invite, which reaches alice; alice joins and speaks.
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/invite",
            syn.url(),
            enc(&room)
        ),
        Some(&carol_tok),
        Some(&json!({ "user_id": alice })),
    );
    assert_eq!(s, 200, "{v}");
    eventually(30, "alice is invited", || {
        sync(&hearth.url(), &alice_tok)["rooms"]["invite"]
            .get(&room)
            .map(|_| ())
    });
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            hearth.url(),
            enc(&room),
            enc(&syn.server_name())
        ),
        Some(&alice_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    on_synapse("join");
    hearth.hs.stop().unwrap();
}

#[test]
fn a_synapse_user_knocks_on_a_hearth_room_and_is_let_in() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (_, alice_tok) = register(&hearth.url(), "alice");
    let (dave, dave_tok) = register(&syn.url(), "dave_knocks");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", hearth.url()),
        Some(&alice_tok),
        Some(&knock_room_body("Hearth knock room")),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();

    // Dave knocks through Synapse, which asks Hearth (make_knock, send_knock).
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/knock/{}?via={}",
            syn.url(),
            enc(&room),
            enc(&hearth.server_name())
        ),
        Some(&dave_tok),
        Some(&json!({ "reason": "from Synapse" })),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        membership(&hearth.url(), &alice_tok, &room, &dave).as_deref(),
        Some("knock")
    );
    // Synapse shows dave the stripped state Hearth answered with.
    let (events, since) = eventually(30, "dave's sync lists the knock", || {
        let v = sync(&syn.url(), &dave_tok);
        let since = v["next_batch"].as_str()?.to_owned();
        knock_state(&v, &room).map(|e| (e, since))
    });
    assert!(has_join_rule_knock(&events), "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e["content"]["name"] == "Hearth knock room"),
        "{events:?}"
    );

    // Alice accepts with an invite; dave joins from Synapse.
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/invite",
            hearth.url(),
            enc(&room)
        ),
        Some(&alice_tok),
        Some(&json!({ "user_id": dave })),
    );
    assert_eq!(s, 200, "{v}");
    // Incremental syncs: Synapse answers a repeated identical sync from its response cache.
    let mut since = since;
    eventually(30, "dave sees the invite", || {
        let (_, v) = curl(
            "GET",
            &format!(
                "{}/_matrix/client/v3/sync?since={since}&timeout=1000",
                syn.url()
            ),
            Some(&dave_tok),
            None,
        );
        if let Some(n) = v["next_batch"].as_str() {
            since = n.to_owned();
        }
        v["rooms"]["invite"].get(&room).map(|_| ())
    });
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            syn.url(),
            enc(&room),
            enc(&hearth.server_name())
        ),
        Some(&dave_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        membership(&hearth.url(), &alice_tok, &room, &dave).as_deref(),
        Some("join")
    );
    hearth.hs.stop().unwrap();
}
