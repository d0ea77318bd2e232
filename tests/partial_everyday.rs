//! What a user can do at once in a room joined with partial state (issue 12): reading incoming
//! events and state changes, changing display name, adding and reading an alias, typing,
//! receipts, presence and to-device messages, and a ban that holds through the resync. The
//! resident sits behind a test front that holds `/state_ids`, so the room stays partial on the
//! joiner for exactly as long as the test needs; every step is checked while it is.

mod common;

use common::{
    fed::{curl, joined_members_within, register, Hearth},
    front::Front,
    synapse::eventually,
};
use serde_json::{json, Value};

const STATE_IDS: &str = "/_matrix/federation/v1/state_ids/";

fn ok(method: &str, url: &str, token: &str, body: Value) -> Value {
    let (s, v) = curl(method, url, Some(token), Some(&body));
    assert_eq!(s, 200, "{method} {url}: {v}");
    v
}

fn get(url: &str, token: &str) -> (u16, Value) {
    curl("GET", url, Some(token), None)
}

/// One lazy-loading `/sync` (the room is shown while partial only to those).
fn sync(base: &str, token: &str, since: &mut Option<String>) -> Value {
    let filter = common::enc(r#"{"room":{"state":{"lazy_load_members":true}}}"#);
    let mut url = format!("{base}/_matrix/client/v3/sync?timeout=500&filter={filter}");
    if let Some(s) = since.as_deref() {
        url.push_str(&format!("&since={s}"));
    }
    let (s, v) = get(&url, token);
    assert_eq!(s, 200, "{v}");
    *since = v["next_batch"].as_str().map(str::to_owned);
    v
}

/// Syncs until `f` finds what it wants in a response (bounded).
fn sync_until<T>(
    base: &str,
    token: &str,
    since: &mut Option<String>,
    what: &str,
    mut f: impl FnMut(&Value) -> Option<T>,
) -> T {
    eventually(30, what, || f(&sync(base, token, since)))
}

fn ephemeral_of<'a>(v: &'a Value, room: &str, kind: &str) -> Vec<&'a Value> {
    v["rooms"]["join"][room]["ephemeral"]["events"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["type"] == kind).collect())
        .unwrap_or_default()
}

/// Whether a `/sync` response shows `user` typing in the room.
fn typing_in(v: &Value, room: &str, user: &str) -> bool {
    ephemeral_of(v, room, "m.typing").iter().any(|e| {
        e["content"]["user_ids"]
            .as_array()
            .is_some_and(|u| u.contains(&json!(user)))
    })
}

/// Whether a `/sync` response carries `user`'s read receipt for `event`.
fn receipt_in(v: &Value, room: &str, event: &str, user: &str) -> bool {
    ephemeral_of(v, room, "m.receipt")
        .iter()
        .any(|e| !e["content"][event]["m.read"][user].is_null())
}

/// The resident `a` behind a test front (under the front's name), and the joiner `b`.
fn resident_and_joiner() -> (Front, Hearth, Hearth) {
    let front = Front::start();
    let name = front.server_name();
    let a = Hearth::start_with("127.0.0.1", |c| c.server_name = name);
    front.forward_to(a.port);
    (front, a, Hearth::start())
}

fn partial_rooms(h: &Hearth) -> Value {
    let app = h.hs.app();
    json!(smol::block_on(
        app.store
            .read(|c| { Ok(hearth::store::partial::list_partial_state_rooms(c)?.len()) })
    )
    .unwrap())
}

#[test]
fn while_partial_a_user_reads_writes_and_talks_at_once_and_a_ban_holds() {
    let (front, a, b) = resident_and_joiner();
    let (au, bu) = (a.url(), b.url());
    let (alice, alice_tok) = register(&au, "alice");
    for i in 0..4 {
        register(&au, &format!("m{i}"));
    }
    let v = ok(
        "POST",
        &format!("{au}/_matrix/client/v3/createRoom"),
        &alice_tok,
        json!({ "preset": "public_chat", "name": "Everyday" }),
    );
    let room = v["room_id"].as_str().unwrap().to_owned();
    let r = common::enc(&room);
    let (bob, bob_tok) = register(&bu, "bob");
    let (dan, dan_tok) = register(&bu, "dan");

    front.hold(STATE_IDS);
    let join = format!(
        "{bu}/_matrix/client/v3/join/{r}?server_name={}",
        common::enc(&a.server_name())
    );
    ok("POST", &join, &bob_tok, json!({}));
    ok("POST", &join, &dan_tok, json!({}));
    front.wait_held(STATE_IDS, 30);
    assert_eq!(partial_rooms(&b), json!(1), "the room is partial on b");

    let mut bob_since = None;
    let mut alice_since = None;
    sync(&bu, &bob_tok, &mut bob_since);
    sync(&au, &alice_tok, &mut alice_since);

    // Incoming events and state changes reach bob at once.
    ok(
        "PUT",
        &format!("{au}/_matrix/client/v3/rooms/{r}/send/m.room.message/a1"),
        &alice_tok,
        json!({ "msgtype": "m.text", "body": "hello partial bob" }),
    );
    ok(
        "PUT",
        &format!("{au}/_matrix/client/v3/rooms/{r}/state/m.room.topic"),
        &alice_tok,
        json!({ "topic": "set while b is partial" }),
    );
    let alice_msg = sync_until(
        &bu,
        &bob_tok,
        &mut bob_since,
        "bob gets alice's message",
        |v| {
            v["rooms"]["join"][&room]["timeline"]["events"]
                .as_array()?
                .iter()
                .find(|e| e["content"]["body"] == "hello partial bob")
                .map(|e| e["event_id"].as_str().unwrap().to_owned())
        },
    );
    eventually(30, "b's room state has alice's topic", || {
        let (s, v) = get(
            &format!("{bu}/_matrix/client/v3/rooms/{r}/state/m.room.topic"),
            &bob_tok,
        );
        (s == 200 && v["topic"] == "set while b is partial").then_some(())
    });

    // A display name change goes out as a member event; alice's server shows it.
    ok(
        "PUT",
        &format!("{bu}/_matrix/client/v3/profile/{bob}/displayname"),
        &bob_tok,
        json!({ "displayname": "Partial Bob" }),
    );
    eventually(30, "a has bob's new display name", || {
        joined_members_within(&au, &alice_tok, &room, 5)
            .filter(|m| m.contains(&bob))
            .and_then(|_| {
                let (s, v) = get(
                    &format!("{au}/_matrix/client/v3/rooms/{r}/state/m.room.member/{bob}"),
                    &alice_tok,
                );
                (s == 200 && v["displayname"] == "Partial Bob").then_some(())
            })
    });

    // An alias on b: added and read back while partial.
    let alias = format!("#everyday:{}", b.server_name());
    ok(
        "PUT",
        &format!(
            "{bu}/_matrix/client/v3/directory/room/{}",
            common::enc(&alias)
        ),
        &bob_tok,
        json!({ "room_id": room }),
    );
    let (s, v) = get(
        &format!(
            "{bu}/_matrix/client/v3/directory/room/{}",
            common::enc(&alias)
        ),
        &bob_tok,
    );
    assert_eq!(
        (s, v["room_id"].as_str()),
        (200, Some(room.as_str())),
        "{v}"
    );

    // Typing, a read receipt and presence reach alice; a to-device message reaches her device.
    ok(
        "PUT",
        &format!("{bu}/_matrix/client/v3/rooms/{r}/typing/{bob}"),
        &bob_tok,
        json!({ "typing": true, "timeout": 30000 }),
    );
    ok(
        "POST",
        &format!(
            "{bu}/_matrix/client/v3/rooms/{r}/receipt/m.read/{}",
            common::enc(&alice_msg)
        ),
        &bob_tok,
        json!({}),
    );
    ok(
        "PUT",
        &format!("{bu}/_matrix/client/v3/presence/{bob}/status"),
        &bob_tok,
        json!({ "presence": "online", "status_msg": "partially here" }),
    );
    let (_, who) = get(
        &format!("{au}/_matrix/client/v3/account/whoami"),
        &alice_tok,
    );
    let alice_device = who["device_id"].as_str().unwrap().to_owned();
    ok(
        "PUT",
        &format!("{bu}/_matrix/client/v3/sendToDevice/org.example.ping/td1"),
        &bob_tok,
        json!({ "messages": { alice.as_str(): { alice_device.as_str(): { "n": 1 } } } }),
    );
    let (mut typing, mut receipt, mut presence, mut to_device) = (false, false, false, false);
    sync_until(
        &au,
        &alice_tok,
        &mut alice_since,
        "alice gets bob's typing, receipt, presence and to-device message",
        |v| {
            typing |= typing_in(v, &room, &bob);
            receipt |= receipt_in(v, &room, &alice_msg, &bob);
            presence |= v["presence"]["events"].as_array().is_some_and(|a| {
                a.iter().any(|e| {
                    e["sender"] == bob.as_str() && e["content"]["status_msg"] == "partially here"
                })
            });
            to_device |= v["to_device"]["events"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|e| e["type"] == "org.example.ping" && e["sender"] == bob.as_str())
            });
            (typing && receipt && presence && to_device).then_some(())
        },
    );

    // alice bans dan while b is partial: dan is out on b at once, cannot speak or rejoin.
    ok(
        "POST",
        &format!("{au}/_matrix/client/v3/rooms/{r}/ban"),
        &alice_tok,
        json!({ "user_id": dan, "reason": "test" }),
    );
    eventually(30, "b has dan banned", || {
        let (s, v) = get(
            &format!("{bu}/_matrix/client/v3/rooms/{r}/state/m.room.member/{dan}"),
            &bob_tok,
        );
        (s == 200 && v["membership"] == "ban").then_some(())
    });
    let (s, _) = curl(
        "PUT",
        &format!("{bu}/_matrix/client/v3/rooms/{r}/send/m.room.message/d1"),
        Some(&dan_tok),
        Some(&json!({ "msgtype": "m.text", "body": "banned" })),
    );
    assert_eq!(s, 403);
    let (s, _) = curl("POST", &join, Some(&dan_tok), Some(&json!({})));
    assert_eq!(s, 403, "a banned user cannot rejoin");
    assert_eq!(
        partial_rooms(&b),
        json!(1),
        "all of it happened while partial"
    );

    // The resync completes: everything above is still right, and the member lists agree.
    front.pass(STATE_IDS);
    eventually(60, "the room is fully stated on b", || {
        (partial_rooms(&b) == json!(0)).then_some(())
    });
    let on_a = joined_members_within(&au, &alice_tok, &room, 5).unwrap();
    let on_b = joined_members_within(&bu, &bob_tok, &room, 5).unwrap();
    assert_eq!(on_a, on_b);
    assert!(on_b.contains(&bob) && !on_b.contains(&dan), "{on_b:?}");
    let (s, v) = get(
        &format!("{bu}/_matrix/client/v3/rooms/{r}/state/m.room.member/{dan}"),
        &bob_tok,
    );
    assert_eq!((s, v["membership"].as_str()), (200, Some("ban")), "{v}");
    let (s, v) = get(
        &format!("{bu}/_matrix/client/v3/rooms/{r}/state/m.room.member/{bob}"),
        &bob_tok,
    );
    assert_eq!(
        (s, v["displayname"].as_str()),
        (200, Some("Partial Bob")),
        "{v}"
    );
    let (s, v) = get(
        &format!("{bu}/_matrix/client/v3/rooms/{r}/state/m.room.topic"),
        &bob_tok,
    );
    assert_eq!(
        (s, v["topic"].as_str()),
        (200, Some("set while b is partial"))
    );

    // Unbanned, dan rejoins.
    ok(
        "POST",
        &format!("{au}/_matrix/client/v3/rooms/{r}/unban"),
        &alice_tok,
        json!({ "user_id": dan }),
    );
    eventually(30, "dan rejoins after the unban", || {
        (curl("POST", &join, Some(&dan_tok), Some(&json!({}))).0 == 200).then_some(())
    });
}

/// Typing and read receipts of a member the joiner's partial state does not hold yet (joined
/// before it, in a named room: neither hero nor in the join's auth events) reach the joiner's
/// users while the room is partial: the sending server is one of the room's servers.
#[test]
fn while_partial_typing_and_receipts_of_members_not_yet_known_arrive() {
    let (front, a, b) = resident_and_joiner();
    let (au, bu) = (a.url(), b.url());
    let (_, alice_tok) = register(&au, "alice");
    let (carol, carol_tok) = register(&au, "carol");
    let v = ok(
        "POST",
        &format!("{au}/_matrix/client/v3/createRoom"),
        &alice_tok,
        json!({ "preset": "public_chat", "name": "Known later" }),
    );
    let room = v["room_id"].as_str().unwrap().to_owned();
    let r = common::enc(&room);
    ok(
        "POST",
        &format!("{au}/_matrix/client/v3/join/{r}"),
        &carol_tok,
        json!({}),
    );
    let (_, bob_tok) = register(&bu, "bob");
    front.hold(STATE_IDS);
    ok(
        "POST",
        &format!(
            "{bu}/_matrix/client/v3/join/{r}?server_name={}",
            common::enc(&a.server_name())
        ),
        &bob_tok,
        json!({}),
    );
    front.wait_held(STATE_IDS, 30);
    assert_eq!(partial_rooms(&b), json!(1), "the room is partial on b");
    let (s, m) = get(
        &format!("{bu}/_matrix/client/v3/rooms/{r}/state/m.room.member/{carol}"),
        &bob_tok,
    );
    assert_eq!(s, 404, "b holds no membership of carol yet: {m}");

    let mut bob_since = None;
    sync(&bu, &bob_tok, &mut bob_since);
    let msg = ok(
        "PUT",
        &format!("{au}/_matrix/client/v3/rooms/{r}/send/m.room.message/k1"),
        &alice_tok,
        json!({ "msgtype": "m.text", "body": "read me" }),
    )["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(
        "PUT",
        &format!("{au}/_matrix/client/v3/rooms/{r}/typing/{carol}"),
        &carol_tok,
        json!({ "typing": true, "timeout": 30000 }),
    );
    ok(
        "POST",
        &format!(
            "{au}/_matrix/client/v3/rooms/{r}/receipt/m.read/{}",
            common::enc(&msg)
        ),
        &carol_tok,
        json!({}),
    );
    let (mut typing, mut receipt) = (false, false);
    sync_until(
        &bu,
        &bob_tok,
        &mut bob_since,
        "bob sees carol typing and her receipt while partial",
        |v| {
            typing |= typing_in(v, &room, &carol);
            receipt |= receipt_in(v, &room, &msg, &carol);
            (typing && receipt).then_some(())
        },
    );
    assert_eq!(partial_rooms(&b), json!(1), "still partial throughout");
    front.pass(STATE_IDS);
}
