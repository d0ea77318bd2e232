//! Two Hearth servers federating on loopback (TLS, IP-literal names): joining through the
//! other, what the resident server serves about its room, and forged or unauthorised PDUs
//! refused and never stored as accepted.

mod common;

use common::fed::{curl, register, Hearth};
use hearth::{
    room::build::{self, NewEvent},
    store::queries as q,
    App,
};
use ruma::{
    api::federation::{
        authorization::get_event_authorization, backfill::get_backfill, event::get_missing_events,
        event::get_room_state_ids, transactions::send_transaction_message,
    },
    OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId,
};
use serde_json::{json, Value};

/// A room on `a` (alice, public), joined from `b` by bob through `a`.
struct Pair {
    a: Hearth,
    b: Hearth,
    alice_tok: String,
    bob: OwnedUserId,
    bob_tok: String,
    room: OwnedRoomId,
}

fn pair() -> Pair {
    let a = Hearth::start();
    let b = Hearth::start();
    let (_, alice_tok) = register(&a.url(), "alice");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", a.url()),
        Some(&alice_tok),
        Some(&json!({ "preset": "public_chat", "name": "A's room" })),
    );
    assert_eq!(s, 200, "{v}");
    let room: OwnedRoomId = v["room_id"].as_str().unwrap().try_into().unwrap();
    let bob: OwnedUserId = bob.as_str().try_into().unwrap();
    let via: OwnedServerName = a.server_name().as_str().try_into().unwrap();
    smol::block_on(hearth::ops::federation::join_remote(
        b.hs.app(),
        &bob,
        &room,
        &[via],
    ))
    .expect("b joins a's room through a");
    Pair {
        a,
        b,
        alice_tok,
        bob,
        bob_tok,
        room,
    }
}

fn send_msg(p: &Pair, txn: &str, body: &str) -> String {
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
            p.a.url(),
            common::enc(p.room.as_str())
        ),
        Some(&p.alice_tok),
        Some(&json!({ "msgtype": "m.text", "body": body })),
    );
    assert_eq!(s, 200, "{v}");
    v["event_id"].as_str().unwrap().to_owned()
}

/// A PDU built on `app`'s view of the room by `sender`, signed with `app`'s key; `tamper`
/// edits the signed object before it is sent.
fn signed_pdu(
    app: &App,
    room: &OwnedRoomId,
    sender: &OwnedUserId,
    ev: NewEvent,
    tamper: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> (OwnedEventId, Box<serde_json::value::RawValue>) {
    malformed_pdu(app, room, sender, ev, |_| {}, tamper)
}

/// Like [`signed_pdu`], with `edit` applied before hashing and signing: a PDU its origin
/// really signed, in a shape of the origin's choosing.
fn malformed_pdu(
    app: &App,
    room: &OwnedRoomId,
    sender: &OwnedUserId,
    ev: NewEvent,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
    tamper: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> (OwnedEventId, Box<serde_json::value::RawValue>) {
    let (r, s, origin, now) = (
        room.clone(),
        sender.clone(),
        app.server_name.to_string(),
        app.clock.now_ms(),
    );
    let prepared = smol::block_on(
        app.store
            .read(move |c| build::prepare(c, &origin, &r, &s, ev, None, now)),
    )
    .unwrap();
    let mut unsigned: serde_json::Map<String, Value> =
        serde_json::from_value(prepared.pdu).unwrap();
    edit(&mut unsigned);
    let mut obj: ruma::CanonicalJsonObject =
        serde_json::from_value(Value::Object(unsigned)).unwrap();
    ruma::signatures::hash_and_sign_event(
        app.server_name.as_str(),
        &app.local.key.pair,
        &mut obj,
        &prepared.rules.redaction,
    )
    .unwrap();
    let mut v: serde_json::Map<String, Value> =
        serde_json::from_value(serde_json::to_value(&obj).unwrap()).unwrap();
    tamper(&mut v);
    let obj: ruma::CanonicalJsonObject = serde_json::from_value(Value::Object(v)).unwrap();
    let id = ruma::signatures::reference_hash(&obj, &prepared.rules).unwrap();
    (
        format!("${id}").try_into().unwrap(),
        serde_json::value::to_raw_value(&obj).unwrap(),
    )
}

fn push(p: &Pair, pdus: Vec<Box<serde_json::value::RawValue>>) -> Value {
    let app = p.b.hs.app();
    let dest: OwnedServerName = p.a.server_name().as_str().try_into().unwrap();
    let req = send_transaction_message::v1::Request::new(
        format!("t{}", app.clock.now_ms()).into(),
        app.server_name.clone(),
        ruma::MilliSecondsSinceUnixEpoch::now(),
    );
    let mut req = req;
    req.pdus = pdus;
    let res = smol::block_on(app.fed.client.send(&dest, req)).unwrap();
    serde_json::to_value(
        res.pdus
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.err().unwrap_or_default()))
            .collect::<std::collections::BTreeMap<_, _>>(),
    )
    .unwrap()
}

fn stored(app: &App, id: &OwnedEventId) -> Option<(String, Option<String>, i64)> {
    let id = id.to_string();
    smol::block_on(app.store.read(move |c| {
        Ok(c.query_row(
            "SELECT json, rejected_reason, soft_failed FROM events WHERE event_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ok())
    }))
    .unwrap()
}

#[test]
fn forged_and_unauthorised_pdus_are_refused_and_never_accepted() {
    let p = pair();
    let (a, b) = (p.a.hs.app(), p.b.hs.app());
    let msg = || {
        NewEvent::message(
            "m.room.message",
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
    };

    // A good one is accepted.
    let (good, raw) = signed_pdu(b, &p.room, &p.bob, msg(), |_| {});
    let res = push(&p, vec![raw]);
    assert_eq!(res[good.as_str()], "", "{res}");
    assert_eq!(stored(a, &good).map(|s| s.1), Some(None));

    // Content changed after signing: the hash no longer matches, so it is stored redacted.
    let (tampered, raw) = signed_pdu(b, &p.room, &p.bob, msg(), |v| {
        v["content"]["body"] = json!("changed in flight");
    });
    push(&p, vec![raw]);
    let (json, _, _) = stored(a, &tampered).expect("kept, redacted");
    assert!(!json.contains("changed in flight"), "{json}");

    // Signed by b for a sender of another server: refused, not stored.
    let eve: OwnedUserId = "@eve:evil.example".try_into().unwrap();
    let (forged, raw) = signed_pdu(b, &p.room, &p.bob, msg(), |v| {
        v["sender"] = json!(eve.as_str());
    });
    let res = push(&p, vec![raw]);
    assert_ne!(res[forged.as_str()], "", "{res}");
    assert!(stored(a, &forged).is_none());

    // A signature over other bytes (signed, then the room's depth field changed).
    let (resigned, raw) = signed_pdu(b, &p.room, &p.bob, msg(), |v| {
        v["depth"] = json!(v["depth"].as_u64().unwrap() + 7);
    });
    let res = push(&p, vec![raw]);
    assert_ne!(res[resigned.as_str()], "", "{res}");
    assert!(stored(a, &resigned).is_none());

    // Bob (power 0) changing the power levels: authorised by nothing, stored rejected, and
    // the room's power levels stay alice's.
    let (pl, raw) = signed_pdu(
        b,
        &p.room,
        &p.bob,
        NewEvent::state(
            "m.room.power_levels",
            "",
            json!({ "users": { p.bob.as_str(): 100 } }),
        ),
        |_| {},
    );
    let res = push(&p, vec![raw]);
    assert_ne!(res[pl.as_str()], "", "{res}");
    assert!(
        stored(a, &pl).and_then(|s| s.1).is_some(),
        "stored as rejected"
    );
    let r = p.room.to_string();
    let current = smol::block_on(
        a.store
            .read(move |c| q::get_current_state(c, &r, "m.room.power_levels", "")),
    )
    .unwrap();
    assert_ne!(current.as_deref(), Some(pl.as_str()));

    // Too large.
    let (big, raw) = signed_pdu(b, &p.room, &p.bob, msg(), |v| {
        v["content"]["padding"] = json!("x".repeat(70_000));
    });
    let res = push(&p, vec![raw]);
    assert!(stored(a, &big).is_none(), "{res}");

    // Only the good message (and the redacted one) reach alice's timeline.
    let (_, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20",
            p.a.url(),
            common::enc(p.room.as_str())
        ),
        Some(&p.alice_tok),
        None,
    );
    let ids: Vec<&str> = v["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert!(ids.contains(&good.as_str()));
    for bad in [&forged, &resigned, &pl, &big] {
        assert!(!ids.contains(&bad.as_str()), "{bad} reached clients");
    }
}

#[test]
fn the_resident_server_serves_state_missing_events_backfill_and_auth() {
    let p = pair();
    let sent: Vec<String> = (0..4)
        .map(|i| send_msg(&p, &format!("m{i}"), &format!("m{i}")))
        .collect();
    let b = p.b.hs.app();
    let dest: OwnedServerName = p.a.server_name().as_str().try_into().unwrap();
    let last: OwnedEventId = sent[3].as_str().try_into().unwrap();
    let first: OwnedEventId = sent[0].as_str().try_into().unwrap();

    let ids = smol::block_on(b.fed.client.send(
        &dest,
        get_room_state_ids::v1::Request::new(last.clone(), p.room.clone()),
    ))
    .unwrap();
    let a = p.a.hs.app();
    let r = p.room.to_string();
    let current: Vec<String> = smol::block_on(a.store.read(move |c| {
        Ok(q::list_current_state(c, &r)?
            .into_iter()
            .map(|(_, _, e, _)| e)
            .collect())
    }))
    .unwrap();
    let mut got: Vec<String> = ids.pdu_ids.iter().map(|e| e.to_string()).collect();
    got.sort();
    let mut want = current;
    want.sort();
    assert_eq!(got, want, "state before a message = the current state");
    assert!(!ids.auth_chain_ids.is_empty());

    let missing = smol::block_on(b.fed.client.send(
        &dest,
        get_missing_events::v1::Request::new(
            p.room.clone(),
            vec![first.clone()],
            vec![last.clone()],
        ),
    ))
    .unwrap();
    let bodies: Vec<String> = missing
        .events
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e.get()).unwrap()["content"]["body"]
                .as_str()
                .unwrap_or("")
                .to_owned()
        })
        .collect();
    assert_eq!(
        bodies,
        vec!["m1", "m2"],
        "between the first and the last, oldest first"
    );

    let back = smol::block_on(b.fed.client.send(
        &dest,
        get_backfill::v1::Request::new(p.room.clone(), vec![last.clone()], 3u32.into()),
    ))
    .unwrap();
    assert_eq!(back.pdus.len(), 3);

    let auth = smol::block_on(b.fed.client.send(
        &dest,
        get_event_authorization::v1::Request::new(p.room.clone(), last.clone()),
    ))
    .unwrap();
    let types: Vec<String> = auth
        .auth_chain
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(e.get()).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    for t in ["m.room.create", "m.room.power_levels", "m.room.member"] {
        assert!(types.iter().any(|x| x == t), "{t} missing from {types:?}");
    }
}

#[test]
fn an_invite_to_another_server_is_cosigned_shown_and_accepted() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (alice, alice_tok) = register(&a.url(), "alice");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", a.url()),
        Some(&alice_tok),
        Some(&json!({ "preset": "private_chat", "name": "Invite only" })),
    );
    assert_eq!(s, 200, "{v}");
    let room: OwnedRoomId = v["room_id"].as_str().unwrap().try_into().unwrap();
    let alice: OwnedUserId = alice.as_str().try_into().unwrap();
    let bob: OwnedUserId = bob.as_str().try_into().unwrap();
    let via: OwnedServerName = a.server_name().as_str().try_into().unwrap();

    // Not invited yet: the join rule refuses bob.
    assert!(smol::block_on(hearth::ops::federation::join_remote(
        b.hs.app(),
        &bob,
        &room,
        std::slice::from_ref(&via)
    ))
    .is_err());

    let invite = smol::block_on(hearth::ops::federation::invite_remote(
        a.hs.app(),
        &alice,
        &room,
        &bob,
        Some("come in".into()),
    ))
    .expect("b co-signs the invite");
    // Both servers signed it.
    let id = invite.to_string();
    let json: String = smol::block_on(
        a.hs.app()
            .store
            .read(move |c| Ok(q::get_event(c, &id)?.unwrap().json)),
    )
    .unwrap();
    let v: Value = serde_json::from_str(&json).unwrap();
    assert!(v["signatures"][a.server_name()].is_object(), "{v}");
    assert!(v["signatures"][b.server_name()].is_object(), "{v}");

    // Bob sees the invite, with the room's name from the stripped state.
    let (_, v) = curl(
        "GET",
        &format!("{}/_matrix/client/v3/sync?timeout=0", b.url()),
        Some(&bob_tok),
        None,
    );
    let events = v["rooms"]["invite"][room.as_str()]["invite_state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Invite only"),
        "{v}"
    );
    assert!(events
        .iter()
        .any(|e| e["type"] == "m.room.member" && e["content"]["membership"] == "invite"));

    // Accepting: the join goes through a, and both sides agree bob is in.
    smol::block_on(hearth::ops::federation::join_remote(
        b.hs.app(),
        &bob,
        &room,
        &[via],
    ))
    .expect("invited, bob may join");
    let (_, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/joined_members",
            a.url(),
            common::enc(room.as_str())
        ),
        Some(&alice_tok),
        None,
    );
    assert!(v["joined"].get(bob.as_str()).is_some(), "{v}");
    // The join is partial-state: a non-lazy /sync shows the room once the resync completes.
    let v = common::synapse::eventually(30, "the joined room reaches bob's /sync", || {
        let (_, v) = curl(
            "GET",
            &format!("{}/_matrix/client/v3/sync?timeout=0", b.url()),
            Some(&bob_tok),
            None,
        );
        v["rooms"]["join"].get(room.as_str()).is_some().then_some(v)
    });
    assert!(v["rooms"]["invite"].get(room.as_str()).is_none(), "{v}");
}

#[test]
fn declining_an_invite_goes_through_the_inviting_server() {
    let a = Hearth::start();
    let b = Hearth::start();
    let (alice, alice_tok) = register(&a.url(), "alice");
    let (bob, bob_tok) = register(&b.url(), "bob");
    let (_, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", a.url()),
        Some(&alice_tok),
        Some(&json!({ "preset": "private_chat", "invite": [bob] })),
    );
    let room = v["room_id"].as_str().unwrap().to_owned();
    let _ = alice;
    // The invite went out with createRoom (client API → /invite on b).
    let (_, v) = curl(
        "GET",
        &format!("{}/_matrix/client/v3/sync?timeout=0", b.url()),
        Some(&bob_tok),
        None,
    );
    assert!(v["rooms"]["invite"].get(&room).is_some(), "{v}");
    let since = v["next_batch"].as_str().unwrap().to_owned();
    // Bob declines: make_leave/send_leave through a.
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/leave",
            b.url(),
            common::enc(&room)
        ),
        Some(&bob_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    let (_, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
            a.url(),
            common::enc(&room),
            common::enc(&bob)
        ),
        Some(&alice_tok),
        None,
    );
    assert_eq!(v["membership"], "leave", "a sees the decline: {v}");
    let (_, v) = curl(
        "GET",
        &format!("{}/_matrix/client/v3/sync?since={since}&timeout=0", b.url()),
        Some(&bob_tok),
        None,
    );
    assert!(v["rooms"]["leave"].get(&room).is_some(), "{v}");
    assert!(v["rooms"]["invite"].get(&room).is_none(), "{v}");
}

#[test]
fn three_servers_a_join_through_the_resident_reaches_the_third_and_messages_reach_all() {
    let p = pair(); // a hosts, b joined through a
    let c = Hearth::start();
    let (carol, carol_tok) = register(&c.url(), "carol");
    let carol: OwnedUserId = carol.as_str().try_into().unwrap();
    let via: OwnedServerName = p.a.server_name().as_str().try_into().unwrap();
    smol::block_on(hearth::ops::federation::join_remote(
        c.hs.app(),
        &carol,
        &p.room,
        &[via],
    ))
    .expect("c joins through a");
    let member_on_b = |who: &OwnedUserId| -> Option<String> {
        let (r, u) = (p.room.to_string(), who.to_string());
        smol::block_on(
            p.b.hs
                .app()
                .store
                .read(move |c| q::get_membership(c, &r, &u)),
        )
        .unwrap()
    };
    // a forwards carol's join (b never talked to c).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while member_on_b(&carol).as_deref() != Some("join") {
        assert!(
            std::time::Instant::now() < deadline,
            "b never learnt of carol's join"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    // Carol speaks from c: it reaches a and b directly.
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/c1",
            c.url(),
            common::enc(p.room.as_str())
        ),
        Some(&carol_tok),
        Some(&json!({ "msgtype": "m.text", "body": "hello from c" })),
    );
    assert_eq!(s, 200, "{v}");
    let event: OwnedEventId = v["event_id"].as_str().unwrap().try_into().unwrap();
    for (name, server) in [("a", &p.a), ("b", &p.b)] {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let id = event.to_string();
            let held = smol::block_on(
                server
                    .hs
                    .app()
                    .store
                    .read(move |c| Ok(q::get_event(c, &id)?.is_some())),
            )
            .unwrap();
            if held {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} never got carol's message"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
    let _ = (&p.alice_tok, &p.bob);
}

/// A change to a PDU's JSON before it is signed.
type Edit = Box<dyn FnOnce(&mut serde_json::Map<String, Value>)>;

/// Every event row a server holds (accepted, rejected, outlier).
fn event_rows(app: &App) -> i64 {
    smol::block_on(
        app.store
            .read(|c| Ok(c.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?)),
    )
    .unwrap()
}

/// `PUT /send/{txn}` from b to a with an X-Matrix signature by b over `signed` while the
/// request carries `sent` (the same bytes for an honest request).
fn signed_send(p: &Pair, txn: &str, signed: &[u8], sent: &[u8]) -> (u16, Value) {
    use ruma::api::federation::authentication::{XMatrix, XMatrixSigningInput};
    let b = p.b.hs.app();
    let path = format!("/_matrix/federation/v1/send/{txn}");
    let http_req = http::Request::put(&path).body(signed.to_vec()).unwrap();
    let a_name: OwnedServerName = p.a.server_name().as_str().try_into().unwrap();
    let xm = XMatrix::sign_http_request(
        &http_req,
        XMatrixSigningInput::new(b.server_name.clone(), a_name, &b.local.key.pair),
    )
    .unwrap();
    common::fed::curl_raw(
        "PUT",
        &format!("{}{path}", p.a.url()),
        &[
            format!("Authorization: {xm}"),
            "Content-Type: application/json".to_owned(),
        ],
        sent,
    )
}

/// A transaction body claiming to come from `origin`.
fn txn_body(origin: &str, pdus: Vec<Value>, edus: Vec<Value>) -> Vec<u8> {
    json!({ "origin": origin, "origin_server_ts": 1_700_000_000_000u64, "pdus": pdus, "edus": edus })
        .to_string()
        .into_bytes()
}

/// The rest of issue 9's list of malformed input: a room this server is not in, PDUs its
/// origin signed in a malformed shape, a known event ID with other content, oversized and
/// garbage transactions, an X-Matrix signature over another body, a transaction whose
/// `origin` is not its signer. Each is refused, nothing of it is stored, and the server
/// goes on serving.
#[test]
fn malformed_transactions_and_pdus_are_refused_and_never_stored() {
    let p = pair();
    let (a, b) = (p.a.hs.app(), p.b.hs.app());
    let msg = |body: &str| {
        NewEvent::message(
            "m.room.message",
            json!({ "msgtype": "m.text", "body": body }),
        )
    };
    let rows = event_rows(a);

    // A room a is not in (b's own room, correctly signed): not looked at.
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", p.b.url()),
        Some(&p.bob_tok),
        Some(&json!({ "preset": "private_chat" })),
    );
    assert_eq!(s, 200, "{v}");
    let elsewhere: OwnedRoomId = v["room_id"].as_str().unwrap().try_into().unwrap();
    let (foreign, raw) = signed_pdu(b, &elsewhere, &p.bob, msg("elsewhere"), |_| {});
    push(&p, vec![raw]);
    assert!(stored(a, &foreign).is_none());

    // Signed by b, but malformed for the room version: no prev events (nothing to check it
    // against), no depth, a negative depth or timestamp.
    let edits: Vec<(&str, Edit)> = vec![
        (
            "empty prev_events",
            Box::new(|v| drop(v.insert("prev_events".into(), json!([])))),
        ),
        (
            "no prev_events",
            Box::new(|v| drop(v.remove("prev_events"))),
        ),
        ("no depth", Box::new(|v| drop(v.remove("depth")))),
        (
            "negative depth",
            Box::new(|v| drop(v.insert("depth".into(), json!(-3)))),
        ),
        (
            "negative timestamp",
            Box::new(|v| drop(v.insert("origin_server_ts".into(), json!(-3)))),
        ),
    ];
    for (what, edit) in edits {
        let (id, raw) = malformed_pdu(b, &p.room, &p.bob, msg(what), edit, |_| {});
        push(&p, vec![raw]);
        assert!(stored(a, &id).is_none(), "{what}: stored");
    }
    // Signed with a key b never published (the signature moved to an unknown key ID).
    let b_name = p.b.server_name();
    let (unknown_key, raw) = signed_pdu(b, &p.room, &p.bob, msg("unknown key"), |v| {
        let sig = v["signatures"][&b_name]
            .as_object()
            .unwrap()
            .values()
            .next()
            .cloned();
        v["signatures"][&b_name] = json!({ "ed25519:never_published": sig });
    });
    push(&p, vec![raw]);
    assert!(stored(a, &unknown_key).is_none());
    assert_eq!(event_rows(a), rows, "nothing stored so far");

    // A known event ID with other content: the ID (a hash of the redacted event) is the
    // same, so it is the event already held, which keeps its content.
    let (original, raw) = signed_pdu(b, &p.room, &p.bob, msg("original"), |_| {});
    assert_eq!(push(&p, vec![raw.clone()])[original.as_str()], "");
    let mut other: Value = serde_json::from_str(raw.get()).unwrap();
    other["content"]["body"] = json!("other content, same ID");
    let other = serde_json::value::to_raw_value(&other).unwrap();
    push(&p, vec![other]);
    let (json, rejected, _) = stored(a, &original).unwrap();
    assert!(
        json.contains("\"original\"") && rejected.is_none(),
        "{json}"
    );
    let rows = event_rows(a);

    // Oversized transactions: refused whole, none of their PDUs stored.
    let many: Vec<(OwnedEventId, Box<serde_json::value::RawValue>)> = (0..51)
        .map(|i| signed_pdu(b, &p.room, &p.bob, msg(&format!("many {i}")), |_| {}))
        .collect();
    let to_value =
        |r: &serde_json::value::RawValue| serde_json::from_str::<Value>(r.get()).unwrap();
    let body = txn_body(
        &b_name,
        many.iter().map(|(_, r)| to_value(r)).collect(),
        vec![],
    );
    let (s, v) = signed_send(&p, "many-pdus", &body, &body);
    assert_eq!(
        (s, v["errcode"].as_str()),
        (413, Some("M_TOO_LARGE")),
        "51 PDUs: {v}"
    );
    let typing = json!({ "edu_type": "m.typing", "content": {
        "room_id": p.room, "user_id": p.bob, "typing": true } });
    let body = txn_body(&b_name, vec![], vec![typing; 101]);
    let (s, v) = signed_send(&p, "many-edus", &body, &body);
    assert_eq!(
        (s, v["errcode"].as_str()),
        (413, Some("M_TOO_LARGE")),
        "101 EDUs: {v}"
    );
    assert!(many.iter().all(|(id, _)| stored(a, id).is_none()));

    // Garbage among the PDUs (not objects, no room) is dropped; the good PDU beside it is
    // accepted.
    let (good, raw) = signed_pdu(b, &p.room, &p.bob, msg("beside garbage"), |_| {});
    let garbage: Vec<Box<serde_json::value::RawValue>> = [
        json!(5),
        json!("pdu"),
        json!([]),
        json!({}),
        json!({ "room_id": 5 }),
    ]
    .iter()
    .map(|v| serde_json::value::to_raw_value(v).unwrap())
    .chain([raw.clone()])
    .collect();
    let res = push(&p, garbage);
    assert_eq!(res[good.as_str()], "", "{res}");
    assert_eq!(event_rows(a), rows + 1, "only the good one is stored");

    // An integer past canonical JSON's range cannot be signed (X-Matrix signs canonical
    // JSON), so a transaction carrying one is refused whatever its signature covers.
    let (deep, raw) = signed_pdu(b, &p.room, &p.bob, msg("deep"), |_| {});
    let mut huge_depth = to_value(&raw);
    huge_depth["depth"] = json!(1u64 << 60);
    let (s, v) = signed_send(
        &p,
        "huge-depth",
        &txn_body(&b_name, vec![to_value(&raw)], vec![]),
        &txn_body(&b_name, vec![huge_depth], vec![]),
    );
    assert!(matches!(s, 400 | 401), "out-of-range depth: {s} {v}");
    assert!(stored(a, &deep).is_none());

    // At the HTTP level: a signature over another body, a body that is not JSON, a body of
    // the wrong shape, and a transaction whose origin is not the server that signed it.
    let (x, x_raw) = signed_pdu(b, &p.room, &p.bob, msg("signed body"), |_| {});
    let (y, y_raw) = signed_pdu(b, &p.room, &p.bob, msg("sent body"), |_| {});
    let to_value =
        |r: &serde_json::value::RawValue| serde_json::from_str::<Value>(r.get()).unwrap();
    let (s, v) = signed_send(
        &p,
        "other-body",
        &txn_body(&b_name, vec![to_value(&x_raw)], vec![]),
        &txn_body(&b_name, vec![to_value(&y_raw)], vec![]),
    );
    assert_eq!(
        (s, v["errcode"].as_str()),
        (401, Some("M_UNAUTHORIZED")),
        "{v}"
    );
    let (s, v) = signed_send(&p, "garbage", b"{}", b"{\"pdus\": [garbage");
    assert!(matches!(s, 400 | 401), "garbage JSON: {s} {v}");
    let shape = json!({ "origin": b_name, "origin_server_ts": 1, "pdus": "not a list" })
        .to_string()
        .into_bytes();
    let (s, v) = signed_send(&p, "shape", &shape, &shape);
    assert_eq!(s, 400, "wrong shape: {v}");
    let body = txn_body(&p.a.server_name(), vec![to_value(&y_raw)], vec![]);
    let (s, v) = signed_send(&p, "not-my-origin", &body, &body);
    assert_eq!(s, 403, "origin is not the signer: {v}");
    for id in [&x, &y] {
        assert!(stored(a, id).is_none(), "{id} stored");
    }
    assert_eq!(event_rows(a), rows + 1);

    // And a is still well: alice sends, bob's next good PDU is accepted.
    send_msg(&p, "after", "still here");
    let (last, raw) = signed_pdu(b, &p.room, &p.bob, msg("still accepted"), |_| {});
    assert_eq!(push(&p, vec![raw])[last.as_str()], "");
}

/// A room's current state through a server's client API: (type, state_key) → event.
fn client_state(
    base: &str,
    token: &str,
    room: &str,
) -> std::collections::BTreeMap<(String, String), Value> {
    let (s, v) = curl(
        "GET",
        &format!("{base}/_matrix/client/v3/rooms/{}/state", common::enc(room)),
        Some(token),
        None,
    );
    assert_eq!(s, 200, "/state at {base}: {v}");
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let key = (
                e["type"].as_str().unwrap().to_owned(),
                e["state_key"].as_str().unwrap().to_owned(),
            );
            (key, e.clone())
        })
        .collect()
}

fn put_state(base: &str, token: &str, room: &str, kind: &str, content: Value) -> (u16, Value) {
    curl(
        "PUT",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/state/{kind}/",
            common::enc(room)
        ),
        Some(token),
        Some(&content),
    )
}

/// Three Hearths in one room, a fork made by a partition and healed by state resolution:
///
/// - a hosts the room; alice (admin) makes bob (on b) a moderator; carol is on c.
/// - b is killed. On a, alice demotes bob and sets a topic (c gets both; b's copy waits in
///   a's outbox). Then a is killed too, so b, back up, cannot learn of the demotion.
/// - On b, bob (a moderator as far as b knows) renames the room and speaks. c gets both; the
///   rename fails against c's current state (soft-failed), the message is accepted.
/// - a comes back; the partition heals. Resolution puts the demotion first, so bob's
///   rename no longer passes auth: every server ends with the same state, the original
///   name, and bob's client on b sees its room's name reset in its sync's `state`.
#[test]
fn three_servers_a_partition_forks_the_room_and_state_resolution_converges_it() {
    use common::fed::HearthProcess;
    use common::synapse::eventually;
    let mut a = HearthProcess::start();
    let mut b = HearthProcess::start();
    let c = HearthProcess::start();
    let (_, alice) = register(&a.url(), "alice");
    let (bob_id, bob) = register(&b.url(), "bob");
    let (_, carol) = register(&c.url(), "carol");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", a.url()),
        Some(&alice),
        Some(&json!({ "preset": "public_chat", "name": "original" })),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    for (h, tok) in [(&b, &bob), (&c, &carol)] {
        let (s, v) = curl(
            "POST",
            &format!(
                "{}/_matrix/client/v3/join/{}?server_name={}",
                h.url(),
                common::enc(&room),
                common::enc(&a.server_name())
            ),
            Some(tok),
            Some(&json!({})),
        );
        assert_eq!(s, 200, "join through a: {v}");
    }
    let name_event = client_state(&a.url(), &alice, &room)[&("m.room.name".into(), String::new())]
        ["event_id"]
        .clone();
    let mut pl = client_state(&a.url(), &alice, &room)
        [&("m.room.power_levels".into(), String::new())]["content"]
        .clone();
    pl["users"][&bob_id] = json!(50);
    let (s, v) = put_state(&a.url(), &alice, &room, "m.room.power_levels", pl.clone());
    assert_eq!(s, 200, "{v}");
    let bob_level = |h: &HearthProcess, tok: &str| {
        client_state(&h.url(), tok, &room)[&("m.room.power_levels".into(), String::new())]
            ["content"]["users"][&bob_id]
            .as_i64()
    };
    eventually(30, "everyone knows bob is a moderator", || {
        (bob_level(&b, &bob) == Some(50) && bob_level(&c, &carol) == Some(50)).then_some(())
    });
    let v = common_sync(&b, &bob, None);
    let mut since = v["next_batch"].as_str().unwrap().to_owned();

    // The a side of the partition.
    b.kill9();
    pl["users"][&bob_id] = json!(0);
    let (s, v) = put_state(&a.url(), &alice, &room, "m.room.power_levels", pl);
    assert_eq!(s, 200, "{v}");
    let (s, v) = put_state(
        &a.url(),
        &alice,
        &room,
        "m.room.topic",
        json!({ "topic": "from the a side" }),
    );
    assert_eq!(s, 200, "{v}");
    eventually(30, "c gets the a side", || {
        (bob_level(&c, &carol) == Some(0)).then_some(())
    });
    a.kill9();

    // The b side: bob still holds power here.
    b.restart();
    let (s, v) = put_state(
        &b.url(),
        &bob,
        &room,
        "m.room.name",
        json!({ "name": "from the b side" }),
    );
    assert_eq!(s, 200, "bob is a moderator on b: {v}");
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/b1",
            b.url(),
            common::enc(&room)
        ),
        Some(&bob),
        Some(&json!({ "msgtype": "m.text", "body": "from the b side" })),
    );
    assert_eq!(s, 200, "{v}");
    // Bob's client has seen the new name.
    let mut names_seen = Vec::new();
    eventually(10, "bob's client sees the b-side name", || {
        let v = common_sync(&b, &bob, Some(&since));
        since = v["next_batch"].as_str().unwrap().to_owned();
        names_seen.extend(names_in(&v, &room, "timeline"));
        names_seen
            .contains(&"from the b side".to_owned())
            .then_some(())
    });
    eventually(30, "c gets the b side", || {
        common::synapse::room_bodies(&c.url(), &carol, &room, 20)
            .contains(&"from the b side".to_owned())
            .then_some(())
    });

    // Heal: every server ends with the same state.
    a.restart();
    let states = eventually(90, "the three servers converge", || {
        let states = [
            client_state(&a.url(), &alice, &room),
            client_state(&b.url(), &bob, &room),
            client_state(&c.url(), &carol, &room),
        ];
        let ids = |s: &std::collections::BTreeMap<(String, String), Value>| {
            s.iter()
                .map(|(k, e)| (k.clone(), e["event_id"].clone()))
                .collect::<Vec<_>>()
        };
        let b_has_a_side = states[1].contains_key(&("m.room.topic".into(), String::new()));
        (b_has_a_side && ids(&states[0]) == ids(&states[1]) && ids(&states[1]) == ids(&states[2]))
            .then_some(states)
    });
    let name = &states[0][&("m.room.name".into(), String::new())];
    assert_eq!(
        name["event_id"], name_event,
        "the rename did not survive: {name}"
    );
    assert_eq!(
        states[0][&("m.room.topic".into(), String::new())]["content"]["topic"],
        "from the a side"
    );
    assert_eq!(bob_level(&b, &bob), Some(0));

    // Bob's client on b is told: the old name comes back in its sync's state section.
    eventually(30, "bob's client sees the name reset", || {
        let v = common_sync(&b, &bob, Some(&since));
        since = v["next_batch"].as_str().unwrap().to_owned();
        names_in(&v, &room, "state")
            .contains(&"original".to_owned())
            .then_some(())
    });
}

fn common_sync(h: &common::fed::HearthProcess, token: &str, since: Option<&str>) -> Value {
    let q = since.map(|s| format!("&since={s}")).unwrap_or_default();
    let (s, v) = curl(
        "GET",
        &format!("{}/_matrix/client/v3/sync?timeout=500{q}", h.url()),
        Some(token),
        None,
    );
    assert_eq!(s, 200, "{v}");
    v
}

/// Names in the `section` ("state" or "timeline") of a room in a sync response.
fn names_in(v: &Value, room: &str, section: &str) -> Vec<String> {
    v["rooms"]["join"][room][section]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "m.room.name")
        .filter_map(|e| e["content"]["name"].as_str().map(str::to_owned))
        .collect()
}

/// Runs `sql` on a server's database (test set-up the API cannot express).
fn exec(app: &App, sql: String) {
    smol::block_on(app.store.write(move |tx| {
        tx.execute_batch(&sql)?;
        Ok(())
    }))
    .unwrap();
}

/// a misses 70 of bob's messages (b's queue for a is held back, then dropped), then gets the
/// next one: it walks the gap back with `/get_missing_events` page after page (a page is at
/// most 50 events here, 20 from Synapse) and ends with every message, in order.
#[test]
fn a_gap_longer_than_a_page_of_missing_events_is_walked_back_and_filled() {
    use common::synapse::{eventually, room_bodies};
    let p = pair();
    let a_name = p.a.server_name();
    let b = p.b.hs.app();
    exec(
        b,
        format!(
            "INSERT INTO destinations (name, retry_at, backoff_ms, failures)
             VALUES ('{a_name}', 4000000000000, 3600000, 1)
             ON CONFLICT (name) DO UPDATE SET retry_at = excluded.retry_at"
        ),
    );
    let send_b = |body: &str| {
        let (s, v) = curl(
            "PUT",
            &format!(
                "{}/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
                p.b.url(),
                common::enc(p.room.as_str()),
                common::enc(body)
            ),
            Some(&p.bob_tok),
            Some(&json!({ "msgtype": "m.text", "body": body })),
        );
        assert_eq!(s, 200, "{v}");
    };
    let expected: Vec<String> = (0..71).map(|i| format!("gap {i:02}")).collect();
    for body in &expected[..70] {
        send_b(body);
    }
    exec(
        b,
        format!(
            "DELETE FROM outbox WHERE destination = '{a_name}';
             UPDATE destinations SET retry_at = 0, backoff_ms = 0, failures = 0
             WHERE name = '{a_name}'"
        ),
    );
    assert!(
        room_bodies(&p.a.url(), &p.alice_tok, p.room.as_str(), 100)
            .iter()
            .all(|b| !b.starts_with("gap ")),
        "a got none of them"
    );
    send_b(&expected[70]);
    let got = eventually(60, "a fills the gap", || {
        let got: Vec<String> = room_bodies(&p.a.url(), &p.alice_tok, p.room.as_str(), 100)
            .into_iter()
            .filter(|b| b.starts_with("gap "))
            .collect();
        (got.len() >= expected.len()).then_some(got)
    });
    assert_eq!(got, expected);
}

/// A local user's typing that runs out (the client's timeout, no refresh, no explicit stop) is
/// told to the room's other servers as a stop: without it they show the user typing until
/// their own timeout (30 s here, 60 s on Synapse).
#[test]
fn typing_that_times_out_stops_on_the_other_server_too() {
    let p = pair();
    let alice = format!("@alice:{}", p.a.server_name());
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/typing/{}",
            p.a.url(),
            common::enc(p.room.as_str()),
            common::enc(&alice)
        ),
        Some(&p.alice_tok),
        Some(&json!({ "typing": true, "timeout": 1500 })),
    );
    assert_eq!(s, 200, "{v}");
    let room = p.room.to_string();
    let mut since: Option<String> = None;
    let mut typing_seen = |want: bool| {
        let what = if want {
            "bob sees alice typing"
        } else {
            "alice's typing stops on b"
        };
        common::synapse::eventually(10, what, || {
            let q = since
                .as_deref()
                .map(|s| format!("&since={s}"))
                .unwrap_or_default();
            let (s, v) = curl(
                "GET",
                &format!("{}/_matrix/client/v3/sync?timeout=500{q}", p.b.url()),
                Some(&p.bob_tok),
                None,
            );
            assert_eq!(s, 200, "{v}");
            since = v["next_batch"].as_str().map(str::to_owned);
            let typing = v["rooms"]["join"][&room]["ephemeral"]["events"]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["type"] == "m.typing").cloned())?;
            let users = typing["content"]["user_ids"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            (users.contains(&json!(alice)) == want).then_some(())
        })
    };
    typing_seen(true);
    let started = std::time::Instant::now();
    typing_seen(false);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "stopped by a's stop, not by b's own 30 s timeout"
    );
}
