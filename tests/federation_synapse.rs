//! Federation against a real Synapse 1.163 (`../shared/synapse-peer/`, loopback, TLS,
//! IP-literal server names). One Synapse per test file (CI has 2 cores); the venv is created
//! on first use by the synapse-peer scripts.
//!
//! What is proven here: each side fetches and checks the other's signing keys over TLS, signs
//! its requests with X-Matrix, and accepts the other's; forged requests are refused.

mod common;

use common::{
    fed::{curl, curl_bytes, register, Hearth},
    synapse::{eventually, timeline, PerFile, Synapse},
};

use std::{process::Command, time::Duration};

use ruma::api::federation::query::get_profile_information::v1 as profile;
use serde_json::{json, Value};

/// The Synapse this file's tests share: the one `scripts/test.sh` started (its port in
/// `HEARTH_TEST_SYNAPSE_PORT`, stopped by the script), or else one started here and stopped
/// after the last of its tests.
static SYNAPSE: PerFile = PerFile::new(TESTS, || {
    std::env::var("HEARTH_TEST_SYNAPSE_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .map_or_else(Synapse::start, Synapse::shared)
});

/// Tests in this file that take a turn with the Synapse: bump it when adding one.
const TESTS: usize = 7;

#[test]
fn keys_and_x_matrix_work_both_ways_with_synapse() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (alice, alice_tok) = register(&hearth.url(), "alice");
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/profile/{alice}/displayname",
            hearth.url()
        ),
        Some(&alice_tok),
        Some(&json!({ "displayname": "Alice on Hearth" })),
    );
    assert_eq!(s, 200, "{v}");
    let (bob, bob_tok) = register(&syn.url(), "bob");
    let (s, v) = curl(
        "PUT",
        &format!("{}/_matrix/client/v3/profile/{bob}/displayname", syn.url()),
        Some(&bob_tok),
        Some(&json!({ "displayname": "Bob on Synapse" })),
    );
    assert_eq!(s, 200, "{v}");

    // Synapse asks Hearth (it fetches our key, signs with X-Matrix; we fetch its key and
    // check the signature).
    let (s, v) = curl(
        "GET",
        &format!("{}/_matrix/client/v3/profile/{alice}", syn.url()),
        Some(&bob_tok),
        None,
    );
    assert_eq!(s, 200, "Synapse could not read Hearth's profile: {v}");
    assert_eq!(v["displayname"], "Alice on Hearth");

    // Hearth asks Synapse (we sign; Synapse fetches our key and checks).
    let app = hearth.hs.app().clone();
    let bob_id: ruma::OwnedUserId = bob.as_str().try_into().unwrap();
    let dest: ruma::OwnedServerName = syn.server_name().as_str().try_into().unwrap();
    let res = smol::block_on(
        app.fed
            .client
            .send(&dest, profile::Request::new(bob_id.clone())),
    )
    .expect("Synapse answers our signed request");
    assert_eq!(
        res.data.get("displayname").and_then(|v| v.as_str()),
        Some("Bob on Synapse")
    );
    // Synapse's keys were checked and stored.
    let name = dest.to_string();
    let stored = smol::block_on(
        app.store
            .read(move |c| hearth::store::queries::list_server_keys(c, &name)),
    )
    .unwrap();
    assert!(
        !stored.is_empty(),
        "Synapse's key is cached in the database"
    );

    // A remote 404 stays a 404.
    let nobody: ruma::OwnedUserId = format!("@nobody:{dest}").as_str().try_into().unwrap();
    let err =
        smol::block_on(app.fed.client.send(&dest, profile::Request::new(nobody))).unwrap_err();
    assert_eq!(err.status, 404, "{err:?}");
    hearth.hs.stop().unwrap();
}

#[test]
fn forged_federation_requests_are_refused() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (alice, _) = register(&hearth.url(), "alice");
    let path = format!(
        "/_matrix/federation/v1/query/profile?user_id={}",
        common::enc(&alice)
    );
    let url = format!("{}{path}", hearth.url());
    let get = |auth: Option<String>| -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-sk", "--max-time", "30", "-w", "\n%{http_code}"]);
        if let Some(a) = auth {
            cmd.args(["-H", &format!("Authorization: {a}")]);
        }
        let out = cmd.arg(&url).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (
            code.trim().parse().unwrap(),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    };
    let unauthorized = |(s, v): (u16, Value)| {
        assert_eq!(
            (s, v["errcode"].as_str()),
            (401, Some("M_UNAUTHORIZED")),
            "{v}"
        );
    };
    // No authorization, garbage, and a well-formed header with a made-up signature.
    unauthorized(get(None));
    unauthorized(get(Some("X-Matrix garbage".into())));
    let origin = syn.server_name();
    let me = format!("127.0.0.1:{}", hearth.port);
    let forged_sig = "a".repeat(86);
    unauthorized(get(Some(format!(
        "X-Matrix origin=\"{origin}\",destination=\"{me}\",key=\"ed25519:a_abcd\",sig=\"{forged_sig}\""
    ))));
    // A real signature by a key that is not the origin's: sign as Synapse's name with a key
    // of our own making (same request, right destination).
    let der = ruma::signatures::Ed25519KeyPair::generate();
    let pair = ruma::signatures::Ed25519KeyPair::from_der(&der, "a_fake".into()).unwrap();
    let http_req = http::Request::get(&path).body(Vec::<u8>::new()).unwrap();
    let xm = ruma::api::federation::authentication::XMatrix::sign_http_request(
        &http_req,
        ruma::api::federation::authentication::XMatrixSigningInput::new(
            origin.as_str().try_into().unwrap(),
            me.as_str().try_into().unwrap(),
            &pair,
        ),
    )
    .unwrap();
    unauthorized(get(Some(xm.to_string())));
    // A valid signature meant for another destination.
    let xm = ruma::api::federation::authentication::XMatrix::sign_http_request(
        &http_req,
        ruma::api::federation::authentication::XMatrixSigningInput::new(
            me.as_str().try_into().unwrap(),
            "127.0.0.1:1".try_into().unwrap(),
            &hearth.hs.app().local.key.pair,
        ),
    )
    .unwrap();
    unauthorized(get(Some(xm.to_string())));

    // Our published key document is self-signed and for our name.
    let (s, v) = curl(
        "GET",
        &format!("{}/_matrix/key/v2/server", hearth.url()),
        None,
        None,
    );
    assert_eq!(s, 200);
    let name: ruma::OwnedServerName = me.as_str().try_into().unwrap();
    let keys = hearth::fed::keys::check_server_keys(&name, &v.to_string()).unwrap();
    assert_eq!(keys.len(), 1);
    // ...and a copy with a changed field fails the check.
    let mut tampered = v.clone();
    tampered["valid_until_ts"] = json!(v["valid_until_ts"].as_u64().unwrap() + 1);
    assert!(hearth::fed::keys::check_server_keys(&name, &tampered.to_string()).is_err());
    std::thread::sleep(Duration::from_millis(10));
    hearth.hs.stop().unwrap();
}

#[test]
fn a_synapse_user_joins_a_hearth_room_and_speaks() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (alice, alice_tok) = register(&hearth.url(), "alice");
    let (bob, bob_tok) = register(&syn.url(), "bob_joins");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", hearth.url()),
        Some(&alice_tok),
        Some(&json!({ "preset": "public_chat", "name": "Hearth room" })),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();
    let (s, v) = curl(
        "GET",
        &format!("{}/_matrix/client/v3/sync?timeout=0", hearth.url()),
        Some(&alice_tok),
        None,
    );
    assert_eq!(s, 200);
    let mut since = v["next_batch"].as_str().unwrap().to_owned();

    // Synapse joins through us: make_join, send_join (v2), our state and auth chain checked.
    let hearth_name = format!("127.0.0.1:{}", hearth.port);
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            syn.url(),
            common::enc(&room),
            common::enc(&hearth_name)
        ),
        Some(&bob_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "Synapse could not join the Hearth room: {v}");
    // Synapse now knows the room's name from the state we sent.
    let (s, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/state/m.room.name/",
            syn.url(),
            common::enc(&room)
        ),
        Some(&bob_tok),
        None,
    );
    assert_eq!((s, v["name"].as_str()), (200, Some("Hearth room")), "{v}");

    // Alice sees bob join, then his message (sent by Synapse in a transaction).
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/t1",
            syn.url(),
            common::enc(&room)
        ),
        Some(&bob_tok),
        Some(&json!({ "msgtype": "m.text", "body": "hello from Synapse" })),
    );
    assert_eq!(s, 200, "{v}");
    let mut seen: Vec<Value> = Vec::new();
    eventually(30, "bob's join and message reach alice", || {
        let (_, v) = curl(
            "GET",
            &format!(
                "{}/_matrix/client/v3/sync?since={since}&timeout=2000",
                hearth.url()
            ),
            Some(&alice_tok),
            None,
        );
        if let Some(n) = v["next_batch"].as_str() {
            since = n.to_owned();
        }
        seen.extend(timeline(&v, &room));
        seen.iter()
            .any(|e| e["content"]["body"] == "hello from Synapse")
            .then_some(())
    });
    assert!(
        seen.iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == bob.as_str()),
        "bob's join is in alice's timeline: {seen:?}"
    );

    // Typing and a read receipt from Synapse reach alice too (EDUs in a transaction).
    let msg_id = seen
        .iter()
        .find(|e| e["content"]["body"] == "hello from Synapse")
        .and_then(|e| e["event_id"].as_str())
        .unwrap()
        .to_owned();
    type_and_read(&syn.url(), &bob_tok, &room, &bob, &msg_id);
    typing_and_receipt_reach(
        &hearth.url(),
        &alice_tok,
        &mut Some(since),
        &room,
        &bob,
        &msg_id,
        "bob's typing and receipt reach alice",
    );

    // And the other way: alice's message reaches bob on Synapse (our outbox and sender).
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/h1",
            hearth.url(),
            common::enc(&room)
        ),
        Some(&alice_tok),
        Some(&json!({ "msgtype": "m.text", "body": "hello from Hearth" })),
    );
    assert_eq!(s, 200, "{v}");
    synapse_sees(syn, &bob_tok, &room, "hello from Hearth");

    // And alice's typing and public read receipt (of bob's message) reach bob on Synapse.
    type_and_read(&hearth.url(), &alice_tok, &room, &alice, &msg_id);
    typing_and_receipt_reach(
        &syn.url(),
        &bob_tok,
        &mut None,
        &room,
        &alice,
        &msg_id,
        "alice's typing and receipt reach bob on Synapse",
    );
    hearth.hs.stop().unwrap();
}

/// `user` (at `base`) starts typing in `room` and sends a public read receipt for `msg_id`.
fn type_and_read(base: &str, token: &str, room: &str, user: &str, msg_id: &str) {
    let (s, v) = curl(
        "PUT",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/typing/{}",
            common::enc(room),
            common::enc(user)
        ),
        Some(token),
        Some(&json!({ "typing": true, "timeout": 20000 })),
    );
    assert_eq!(s, 200, "{v}");
    let (s, v) = curl(
        "POST",
        &format!(
            "{base}/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
            common::enc(room),
            common::enc(msg_id)
        ),
        Some(token),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
}

/// Syncs `token`'s user on `base` until `user`'s typing and read receipt of `msg_id` in
/// `room` have both shown in the ephemeral events.
fn typing_and_receipt_reach(
    base: &str,
    token: &str,
    since: &mut Option<String>,
    room: &str,
    user: &str,
    msg_id: &str,
    what: &str,
) {
    let (mut typing_seen, mut receipt_seen) = (false, false);
    eventually(30, what, || {
        let url = match since.as_deref() {
            Some(t) => format!("{base}/_matrix/client/v3/sync?since={t}&timeout=2000"),
            None => format!("{base}/_matrix/client/v3/sync?timeout=0"),
        };
        let (_, v) = curl("GET", &url, Some(token), None);
        if let Some(n) = v["next_batch"].as_str() {
            *since = Some(n.to_owned());
        }
        for e in v["rooms"]["join"][room]["ephemeral"]["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            if e["type"] == "m.typing"
                && e["content"]["user_ids"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|u| u == user))
            {
                typing_seen = true;
            }
            if e["type"] == "m.receipt" && e["content"][msg_id]["m.read"].get(user).is_some() {
                receipt_seen = true;
            }
        }
        (typing_seen && receipt_seen).then_some(())
    });
}

/// An initial `/sync` of `token`'s user that has `room` in it: a room joined with partial
/// state shows in a sync not lazy-loading members once its resync is done.
fn initial_sync_with_room(base: &str, token: &str, room: &str) -> Value {
    eventually(30, "the joined room is in the initial sync", || {
        let (s, v) = curl(
            "GET",
            &format!("{base}/_matrix/client/v3/sync?timeout=0"),
            Some(token),
            None,
        );
        (s == 200 && v["rooms"]["join"].get(room).is_some()).then_some(v)
    })
}

#[test]
fn a_hearth_user_joins_a_synapse_room_and_hears_it() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (alice, alice_tok) = register(&hearth.url(), "alice");
    let (_, carol_tok) = register(&syn.url(), "carol_hosts");
    let (s, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", syn.url()),
        Some(&carol_tok),
        Some(&json!({ "preset": "public_chat", "name": "Synapse room", "room_version": "10" })),
    );
    assert_eq!(s, 200, "{v}");
    let room = v["room_id"].as_str().unwrap().to_owned();

    let app = hearth.hs.app().clone();
    let user: ruma::OwnedUserId = alice.as_str().try_into().unwrap();
    let room_id: ruma::OwnedRoomId = room.as_str().try_into().unwrap();
    let via: ruma::OwnedServerName = syn.server_name().as_str().try_into().unwrap();
    smol::block_on(hearth::ops::federation::join_remote(
        &app,
        &user,
        &room_id,
        &[via],
    ))
    .expect("joined through Synapse");

    // The room, with its name from the state Synapse sent, is in alice's sync (once its
    // partial-state resync is done: a sync not lazy-loading members waits for it).
    let v = initial_sync_with_room(&hearth.url(), &alice_tok, &room);
    let r = &v["rooms"]["join"][&room];
    let names: Vec<String> = r["state"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|e| e["type"] == "m.room.name")
        .filter_map(|e| e["content"]["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(names, vec!["Synapse room"], "{v}");
    let mut since = v["next_batch"].as_str().unwrap().to_owned();

    // Synapse knows alice joined; carol speaks and alice hears it.
    let (s, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/joined_members",
            syn.url(),
            common::enc(&room)
        ),
        Some(&carol_tok),
        None,
    );
    assert_eq!(s, 200);
    assert!(
        v["joined"].get(&alice).is_some(),
        "Synapse sees alice joined: {v}"
    );
    let (s, _) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/c1",
            syn.url(),
            common::enc(&room)
        ),
        Some(&carol_tok),
        Some(&json!({ "msgtype": "m.text", "body": "welcome from Synapse" })),
    );
    assert_eq!(s, 200);
    eventually(30, "carol's message reaches alice", || {
        let (_, v) = curl(
            "GET",
            &format!(
                "{}/_matrix/client/v3/sync?since={since}&timeout=2000",
                hearth.url()
            ),
            Some(&alice_tok),
            None,
        );
        if let Some(n) = v["next_batch"].as_str() {
            since = n.to_owned();
        }
        timeline(&v, &room)
            .iter()
            .any(|e| e["content"]["body"] == "welcome from Synapse")
            .then_some(())
    });

    // Alice answers from Hearth; carol reads it on Synapse.
    let (s, v) = curl(
        "PUT",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/a1",
            hearth.url(),
            common::enc(&room)
        ),
        Some(&alice_tok),
        Some(&json!({ "msgtype": "m.text", "body": "thanks, from Hearth" })),
    );
    assert_eq!(s, 200, "{v}");
    synapse_sees(syn, &carol_tok, &room, "thanks, from Hearth");
    hearth.hs.stop().unwrap();
}

/// Waits until `body` is in the room's recent messages as a Synapse user sees them.
fn synapse_sees(syn: &Synapse, token: &str, room: &str, body: &str) {
    eventually(30, &format!("{body:?} reaches Synapse"), || {
        syn.bodies(token, room, 20)
            .iter()
            .any(|b| b == body)
            .then_some(())
    });
}

#[test]
fn invites_joins_and_profiles_through_the_client_api_with_synapse() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (alice, alice_tok) = register(&hearth.url(), "alice");
    let (dave, dave_tok) = register(&syn.url(), "dave_invited");
    let (_, erin_tok) = register(&syn.url(), "erin_invites");
    let (s, _) = curl(
        "PUT",
        &format!("{}/_matrix/client/v3/profile/{dave}/displayname", syn.url()),
        Some(&dave_tok),
        Some(&json!({ "displayname": "Dave" })),
    );
    assert_eq!(s, 200);

    // A remote profile through Hearth's client API.
    let (s, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/profile/{}",
            hearth.url(),
            common::enc(&dave)
        ),
        Some(&alice_tok),
        None,
    );
    assert_eq!((s, v["displayname"].as_str()), (200, Some("Dave")), "{v}");

    // Hearth → Synapse invite into an invite-only Hearth room; dave joins from Synapse.
    let (_, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", hearth.url()),
        Some(&alice_tok),
        Some(&json!({ "preset": "private_chat", "name": "Hearth private" })),
    );
    let room = v["room_id"].as_str().unwrap().to_owned();
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/invite",
            hearth.url(),
            common::enc(&room)
        ),
        Some(&alice_tok),
        Some(&json!({ "user_id": dave })),
    );
    assert_eq!(s, 200, "invite to Synapse: {v}");
    eventually(30, "dave sees the invite", || {
        let (_, v) = curl(
            "GET",
            &format!("{}/_matrix/client/v3/sync?timeout=1000", syn.url()),
            Some(&dave_tok),
            None,
        );
        v["rooms"]["invite"].get(&room).map(|_| ())
    });
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/join",
            syn.url(),
            common::enc(&room)
        ),
        Some(&dave_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "dave joins: {v}");
    let (_, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/joined_members",
            hearth.url(),
            common::enc(&room)
        ),
        Some(&alice_tok),
        None,
    );
    assert!(v["joined"].get(&dave).is_some(), "{v}");

    // Synapse → Hearth invite; alice accepts through Hearth's client API.
    let (_, v) = curl(
        "POST",
        &format!("{}/_matrix/client/v3/createRoom", syn.url()),
        Some(&erin_tok),
        Some(
            &json!({ "preset": "private_chat", "name": "Synapse private", "invite": [alice],
                      "room_version": "10" }),
        ),
    );
    let room2 = v["room_id"].as_str().unwrap().to_owned();
    eventually(30, "alice sees erin's invite", || {
        let (_, v) = curl(
            "GET",
            &format!("{}/_matrix/client/v3/sync?timeout=1000", hearth.url()),
            Some(&alice_tok),
            None,
        );
        let events = v["rooms"]["invite"][&room2]["invite_state"]["events"]
            .as_array()?
            .clone();
        events
            .iter()
            .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Synapse private")
            .then_some(())
    });
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/join",
            hearth.url(),
            common::enc(&room2)
        ),
        Some(&alice_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "alice accepts: {v}");
    let (_, v) = curl(
        "GET",
        &format!(
            "{}/_matrix/client/v3/rooms/{}/joined_members",
            syn.url(),
            common::enc(&room2)
        ),
        Some(&erin_tok),
        None,
    );
    assert!(v["joined"].get(&alice).is_some(), "{v}");
    hearth.hs.stop().unwrap();
}

/// A Hearth user joins a Synapse room that has history and pages `/messages` back to its
/// creation: Hearth backfills from Synapse, and every message comes once, newest first,
/// without the timeline `/sync` already showed.
#[test]
fn a_hearth_user_pages_back_through_a_synapse_rooms_history() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (_, alice_tok) = register(&hearth.url(), "alice");
    let (_, carol_tok) = register(&syn.url(), "carol_history");
    let room = syn.create_public_room(&carol_tok);
    for i in 0..30 {
        let (s, v) = curl(
            "PUT",
            &format!(
                "{}/_matrix/client/v3/rooms/{}/send/m.room.message/h{i}",
                syn.url(),
                common::enc(&room)
            ),
            Some(&carol_tok),
            Some(&json!({ "msgtype": "m.text", "body": format!("old {i}") })),
        );
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = curl(
        "POST",
        &format!(
            "{}/_matrix/client/v3/join/{}?server_name={}",
            hearth.url(),
            common::enc(&room),
            common::enc(&syn.server_name())
        ),
        Some(&alice_tok),
        Some(&json!({})),
    );
    assert_eq!(s, 200, "{v}");
    let v = initial_sync_with_room(&hearth.url(), &alice_tok, &room);
    let tl = &v["rooms"]["join"][&room]["timeline"];
    let seen: Vec<Value> = timeline(&v, &room);
    let mut from = tl["prev_batch"].as_str().expect("a prev_batch").to_owned();
    let mut back: Vec<Value> = Vec::new();
    for _ in 0..50 {
        let (s, v) = curl(
            "GET",
            &format!(
                "{}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10&from={}",
                hearth.url(),
                common::enc(&room),
                common::enc(&from)
            ),
            Some(&alice_tok),
            None,
        );
        assert_eq!(s, 200, "{v}");
        back.extend(v["chunk"].as_array().unwrap().iter().cloned());
        match v["end"].as_str() {
            Some(e) => from = e.to_owned(),
            None => break,
        }
    }
    let bodies: Vec<&str> = back
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    let expected: Vec<String> = (0..30).rev().map(|i| format!("old {i}")).collect();
    assert_eq!(bodies, expected, "every message once, newest first");
    assert_eq!(back.last().unwrap()["type"], "m.room.create");
    for e in &seen {
        assert!(
            !back.iter().any(|b| b["event_id"] == e["event_id"]),
            "the timeline came again: {e}"
        );
    }
    hearth.hs.stop().unwrap();
}

/// A PNG of `w`x`h`.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 200]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// Uploads `bytes` at `base`; returns the media ID.
fn upload_png(base: &str, token: &str, bytes: &[u8]) -> String {
    let url = format!("{base}/_matrix/media/v3/upload?filename=pic.png");
    let (s, body) = curl_bytes("POST", &url, token, Some(bytes));
    assert_eq!(
        s,
        200,
        "upload at {base}: {}",
        String::from_utf8_lossy(&body)
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    v["content_uri"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned()
}

/// Media both ways over federation: Synapse fetches a Hearth upload (Hearth's multipart
/// `/_matrix/federation/v1/media/download`) and Hearth fetches a Synapse upload (parsing
/// Synapse's multipart answer), each serving it to its own user through the authenticated
/// client endpoints, thumbnails included.
#[test]
fn media_crosses_federation_both_ways_with_synapse() {
    let turn = SYNAPSE.turn();
    let syn: &Synapse = &turn;
    let hearth = Hearth::start();
    let (_, alice) = register(&hearth.url(), "alice");
    let (_, carol) = register(&syn.url(), "carol_media");

    let from_hearth = png(300, 200);
    let id = upload_png(&hearth.url(), &alice, &from_hearth);
    let media = format!("{}/_matrix/client/v1/media", syn.url());
    let hs = hearth.server_name();
    let (s, got) = curl_bytes("GET", &format!("{media}/download/{hs}/{id}"), &carol, None);
    assert_eq!(
        s,
        200,
        "Synapse fetching from Hearth: {}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(got, from_hearth);
    let url = format!("{media}/thumbnail/{hs}/{id}?width=96&height=96&method=crop");
    let (s, got) = curl_bytes("GET", &url, &carol, None);
    assert_eq!(
        s,
        200,
        "Synapse thumbnailing Hearth media: {}",
        String::from_utf8_lossy(&got)
    );
    assert!(image::load_from_memory(&got).is_ok());

    let from_synapse = png(200, 150);
    let id = upload_png(&syn.url(), &carol, &from_synapse);
    let media = format!("{}/_matrix/client/v1/media", hearth.url());
    let sn = syn.server_name();
    let (s, got) = curl_bytes("GET", &format!("{media}/download/{sn}/{id}"), &alice, None);
    assert_eq!(
        s,
        200,
        "Hearth fetching from Synapse: {}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(got, from_synapse);
    let url = format!("{media}/thumbnail/{sn}/{id}?width=100&height=100&method=scale");
    let (s, got) = curl_bytes("GET", &url, &alice, None);
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&got));
    let img = image::load_from_memory(&got).unwrap();
    assert_eq!(
        (img.width(), img.height()),
        (200, 150),
        "320x240 box, never upscaled"
    );
}
